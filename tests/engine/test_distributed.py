"""Distributed training on 2 CPU processes (gloo), and the pieces that make it correct.

The 2-process checks share one spawn (``tests/distributed_worker.py``: torch takes seconds to
start): every strategy, accumulation, the DataLoader path, gradients missing on one rank, files,
resume and a failing rank. The single-process references run here, in the test process.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import strategies
from engine import ConfigError, DataError, Engine, EngineConfig, OptimizerSpec, World
from engine.data.batches import batch_bounds, epoch_order, make_batches
from engine.distributed.collectives import (
    _buckets,
    average_gradients,
    broadcast_module,
    sum_named_over_ranks,
    sum_over_ranks,
)
from engine.distributed.session import launch_environment, process_group
from engine.errors import DistributedError
from tests import distributed_worker as worker
from tests.engine import leave_worker
from tests.helpers import free_port

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    folder = tmp_path_factory.mktemp("two-ranks")
    return worker.spawn("training", folder), folder


def _assert_bitwise(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    differing = [key for key in left if not torch.equal(left[key], right[key])]
    assert not differing, f"ranks differ in {differing}"


def _assert_close(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], **TOLERANCE, msg=key)


def _without_seconds(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


# ------------------------------------------------------------ 2 processes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.STRATEGIES))
def test_ranks_stay_identical_and_match_one_process_with_the_global_batch(
    two_ranks: tuple[list[dict[str, Any]], Path], name: str
) -> None:
    (rank0, rank1), _ = two_ranks
    first, second = rank0["strategies"][name], rank1["strategies"][name]
    # Ranks started from different weights: the engine broadcast rank 0's. After every step the
    # parameters' bytes agree, and at the end the optimiser states too.
    assert len(first["step_digests"]) == 2 * worker.N_TRAIN // (2 * worker.BATCH)
    assert first["step_digests"] == second["step_digests"]
    _assert_bitwise(first["params"], second["params"])
    _assert_bitwise(first["optimizer"], second["optimizer"])
    assert _without_seconds(first["history"]) == _without_seconds(second["history"])
    alone = worker.train_strategy(name, rank_seed=0, batch_size=2 * worker.BATCH)
    _assert_close(first["params"], alone["params"])
    _assert_close(first["optimizer"], alone["optimizer"])
    for ranks_epoch, alone_epoch in zip(first["history"], alone["history"]):
        for key, value in alone_epoch.items():
            if key != "seconds":
                assert math.isclose(ranks_epoch[key], value, rel_tol=1e-4, abs_tol=1e-6), key


@pytest.mark.slow
def test_accumulation_under_two_ranks_matches_one_process(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    _assert_bitwise(rank0["accumulate"]["params"], rank1["accumulate"]["params"])
    alone = worker.train_strategy(
        "Standard", rank_seed=0, batch_size=2 * worker.BATCH, accumulate_steps=2
    )
    _assert_close(rank0["accumulate"]["params"], alone["params"])


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    """Rank 1 alone calls ``stop()`` after step 3; the ranks agree at the next log interval
    (``log_every=2``): both stop after step 4, neither waits in a collective."""
    (rank0, rank1), _ = two_ranks
    assert rank0["stop_on_one_rank"] == rank1["stop_on_one_rank"] == {"steps": 4, "stopped": True}


@pytest.mark.slow
def test_streams_of_unequal_length_run_the_same_steps_on_every_rank(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    """An IterableDataset per rank, 9 and 6 batches long, with windows of 4: both ranks run the
    shortest stream's 6 steps (a full window and a short one, stepped) and stay identical."""
    (rank0, rank1), _ = two_ranks
    assert rank0["uneven_streams"]["steps"] == rank1["uneven_streams"]["steps"] == 6
    _assert_bitwise(rank0["uneven_streams"]["params"], rank1["uneven_streams"]["params"])
    # Both streams start with the same samples, so the average is one process on the first 24
    # samples, in order, as a tensor (whose short last window is stepped by arithmetic).
    torch.manual_seed(0)
    alone = worker.Autoencoder()
    first = {key: value[: 6 * worker.BATCH] for key, value in worker.train_data().items()}
    Engine(
        strategies.Standard(OptimizerSpec("Adam", lr=1e-2)),
        worker.config(epochs=1, accumulate_steps=4, shuffle=False),
    ).fit(alone, first)
    _assert_close(rank0["uneven_streams"]["params"], alone.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(worker.random_cases())))
def test_random_runs_keep_ranks_identical_and_match_one_process_when_shares_are_even(
    two_ranks: tuple[list[dict[str, Any]], Path], index: int
) -> None:
    (rank0, rank1), _ = two_ranks
    case = worker.random_cases()[index]
    first, second = rank0["random_cases"][index], rank1["random_cases"][index]
    if isinstance(first, tuple):  # refused: on every rank, naming the sizes
        assert first == second and first[0] == "DataError"
        assert str(case["samples"]) in first[1] and "empty last batch" in first[1]
        return
    assert first["step_digests"] == second["step_digests"]
    _assert_bitwise(first["params"], second["params"])
    _assert_bitwise(first["optimizer"], second["optimizer"])
    global_batch = 2 * case["batch_size"]
    even = case["drop_last"] or case["samples"] % global_batch == 0
    if case["precision"] == "fp32" and even:
        alone = worker.train_case(case, rank_seed=0, ranks=2)
        _assert_close(first["params"], alone["params"])


@pytest.mark.slow
def test_every_sample_is_seen_once_per_epoch_across_ranks(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    for source in ("fast path", "loader path"):
        if source == "fast path":
            epochs0, epochs1 = (
                rank0["strategies"]["Standard"]["samples"],
                rank1["strategies"]["Standard"]["samples"],
            )
        else:
            epochs0, epochs1 = rank0["loader_samples"], rank1["loader_samples"]
        assert len(epochs0) == len(epochs1) == 2
        orders = []
        for epoch, (seen0, seen1) in enumerate(zip(epochs0, epochs1)):
            assert not set(seen0) & set(seen1), f"{source}: ranks share samples"
            assert sorted(seen0 + seen1) == list(range(worker.N_TRAIN)), source
            # Global batch i is rank 0's share, then rank 1's: the order of one process.
            order = epoch_order(worker.N_TRAIN, 0, epoch, shuffle=True).tolist()
            merged = [
                index
                for step in range(len(seen0) // worker.BATCH)
                for part in (seen0, seen1)
                for index in part[step * worker.BATCH : (step + 1) * worker.BATCH]
            ]
            assert merged == order, source
            orders.append(merged)
        assert orders[0] != orders[1], "the shuffle must change per epoch"


@pytest.mark.slow
def test_evaluation_covers_every_sample_once_and_matches_one_process(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    for name in worker.STRATEGIES:
        eval0 = rank0["strategies"][name]["eval_samples"]
        eval1 = rank1["strategies"][name]["eval_samples"]
        for seen0, seen1 in zip(eval0, eval1):
            assert sorted(seen0 + seen1) == list(range(worker.N_EVAL))
            assert len(seen0) + len(seen1) == worker.N_EVAL  # no padding duplicates
    # The eval metric is the sample-weighted mean over all 9 samples (rank 1 saw only 4).
    params = rank0["strategies"]["Standard"]["params"]
    model = worker.Autoencoder()
    model.load_state_dict(params)
    engine = Engine(strategies.Standard(OptimizerSpec("Adam")), worker.config())
    expected = engine.evaluate(model, worker.eval_data())["loss"]
    got = rank0["strategies"]["Standard"]["history"][-1]["eval/loss"]
    assert math.isclose(got, expected, rel_tol=1e-6)


@pytest.mark.slow
def test_evaluation_with_no_batch_on_a_rank_uses_rank_zero_buffers(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    _assert_bitwise(rank0["normed"], rank1["normed"])  # BatchNorm statistics broadcast
    assert rank0["one_sample_eval"] == rank1["one_sample_eval"]
    model = worker.Normed()
    model.load_state_dict(rank0["normed"])
    engine = Engine(strategies.Standard(OptimizerSpec("Adam")), worker.config())
    one = {key: value[:1] for key, value in worker.eval_data().items()}
    expected = engine.evaluate(model, one)
    assert rank0["one_sample_eval"].keys() == expected.keys()
    assert math.isclose(rank0["one_sample_eval"]["loss"], expected["loss"], rel_tol=1e-6)


@pytest.mark.slow
def test_a_gradient_missing_on_one_rank_counts_as_zero_and_missing_everywhere_stays_none(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    _assert_bitwise(rank0["partly_used"], rank1["partly_used"])
    # With weight decay and momentum, a zero-filled gradient would have moved `unused`.
    assert torch.equal(rank0["partly_used"]["unused"], torch.ones(worker.FEATURES))
    assert not torch.equal(rank0["partly_used"]["extra"], torch.ones(worker.FEATURES))


@pytest.mark.slow
def test_only_rank_zero_writes_files(two_ranks: tuple[list[dict[str, Any]], Path]) -> None:
    (rank0, rank1), folder = two_ranks
    assert rank1["files"] == [] and rank1["run_dir"] is None
    assert not (folder / "output-rank1").exists()
    assert {"run/metrics.jsonl", "run/train.log"} <= set(rank0["files"])
    assert any(name.startswith("run/checkpoints/") for name in rank0["files"])


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_a_clear_error(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    assert rank1["failure"] == ("ValueError", "deliberate failure at step 3")
    kind, message = rank0["failure"]
    assert kind == "DistributedError"
    assert "rank 0 of 2" in message and "another rank" in message
    # It did not wait for the 60 s timeout: the failed rank's exit reached it at once.
    assert rank0["failure_seconds"] < 30


@pytest.mark.slow
def test_fit_returns_on_every_rank_only_once_rank_zeros_files_are_on_disk(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    """Rank 0's FIT_END handlers take a moment (then ``Checkpointing`` writes ``last`` and
    ``model_final.pt``): rank 1's ``fit`` returns only after them (the closing barrier)."""
    (rank0, rank1), _ = two_ranks
    everything = {"marker": True, "model_final": True, "last": True}
    assert rank1["after_fit"] == everything
    assert rank0["after_fit"] == everything


@pytest.mark.slow
def test_predict_covers_all_the_data_on_every_rank(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    torch.manual_seed(0)
    alone = Engine(strategies.Standard(OptimizerSpec("Adam")), worker.config()).predict(
        worker.Autoencoder(), worker.eval_data()
    )
    assert set(alone) == {"z"} and len(alone["z"]) == worker.N_EVAL
    for rank in (rank0, rank1):
        assert rank["predict"].keys() == alone.keys()
        assert torch.equal(rank["predict"]["z"], alone["z"])


@pytest.mark.slow
def test_leaving_the_group_joins_its_worker_threads_even_after_a_failure(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    """No gloo worker thread outlives ``leave_process_group`` (one that outlived the interpreter
    would abort the process at exit: "terminate called without an active exception")."""
    if two_ranks[0][0]["gloo_threads_after_leave"] is None:
        pytest.skip("thread names are read from /proc (Linux)")
    assert [rank["gloo_threads_after_leave"] for rank in two_ranks[0]] == [0, 0]


@pytest.mark.slow
def test_leaving_joins_gloo_threads_when_the_optimiser_is_built_after_joining(
    tmp_path: Path,
) -> None:
    """In a process that imports only the engine's session before joining, the first
    optimiser imports torch._dynamo with the group alive (which once made torch hold the group
    for good); leave_process_group still joins every gloo worker thread."""
    mp.start_processes(leave_worker.entry, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["imported_before"] is False, "the scenario no longer tests a late import"
        assert result["sum"] == [2.0, 2.0, 2.0]
        during, after = result["gloo_threads"]
        if during is not None:
            assert during > 0 and after == 0, result["gloo_threads"]


@pytest.mark.slow
def test_a_hung_rank_is_bounded_by_the_distributed_timeout(tmp_path: Path) -> None:
    """Rank 1 hangs, alive, before a gradient all-reduce; rank 0 stops at the timeout of the
    fit that joined the group (5 s) with a DistributedError naming the operation, while rank 1
    still hangs (it waits for rank 0 to give up, at most 90 s)."""
    rank0, rank1 = worker.spawn("hung", tmp_path)
    kind, message = rank0["failure"]
    assert kind == "DistributedError", message
    assert "rank 0 of 2" in message and "all-reduce" in message
    assert rank1["released"] is True, "rank 0 did not give up while rank 1 hung"
    assert rank1["failure"] is not None and rank1["failure"][0] == "DistributedError"


@pytest.mark.slow
def test_resume_of_a_two_process_checkpoint_in_two_processes_is_exact(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, rank1), _ = two_ranks
    _assert_bitwise(rank0["resumed"], rank1["resumed"])
    _assert_bitwise(rank0["resumed"], rank0["resume_reference"])


@pytest.mark.slow
def test_resume_of_a_two_process_checkpoint_in_one_process_with_the_global_batch(
    two_ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    (rank0, _), folder = two_ranks
    after_epoch_1 = folder / "resume/run/checkpoints/epoch-0001"  # written by the 2 ranks
    start = torch.load(after_epoch_1 / "model.pt", weights_only=True)
    resumed = worker.train_resumable(
        0,
        epochs=3,
        folder=folder / "one-process",
        resume=str(after_epoch_1),
        batch_size=2 * worker.BATCH,
    )
    _assert_close(resumed, rank0["resume_reference"])
    assert not torch.allclose(resumed["encoder.0.weight"], start["encoder.0.weight"])


@pytest.mark.slow
def test_torchrun_launch_joins_the_group_and_a_second_fit_works(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "tests.distributed_worker",
        "torchrun",
        str(tmp_path),
    ]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    _assert_bitwise(rank0["first"], rank1["first"])
    _assert_bitwise(rank0["second"], rank0["first"])  # the same seed: the same run again
    _assert_bitwise(rank1["second"], rank1["first"])
    for rank in (rank0, rank1):  # some in the group, none left after leave_process_group
        during, after = rank["gloo_threads"]
        assert during is None or (during > 0 and after == 0), rank["gloo_threads"]


# ---------------------------------------------------------- one process


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 200),
    batch_size=st.integers(1, 40),
    world_size=st.integers(1, 8),
    drop_last=st.booleans(),
)
def test_evaluation_shards_cover_each_sample_exactly_once(
    n: int, batch_size: int, world_size: int, drop_last: bool
) -> None:
    seen: list[int] = []
    for rank in range(world_size):
        world = World(rank=rank, world_size=world_size)
        batches = make_batches(
            {"i": torch.arange(n)},
            name="evaluation",
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            seed=0,
            device=torch.device("cpu"),
            world=world,
            lockstep=False,
        )
        for batch in batches.epoch(0):
            assert 0 < len(batch["i"]) <= batch_size
            seen.extend(batch["i"].tolist())
    assert sorted(seen) == list(range(n))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 200),
    batch_size=st.integers(1, 40),
    world_size=st.integers(1, 8),
    drop_last=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_training_shards_are_disjoint_in_lockstep_or_refused_on_every_rank(
    n: int, batch_size: int, world_size: int, drop_last: bool, epoch: int
) -> None:
    outcomes: list[Any] = []
    for rank in range(world_size):
        try:
            batches = make_batches(
                {"i": torch.arange(n)},
                name="training",
                batch_size=batch_size,
                shuffle=True,
                drop_last=drop_last,
                seed=3,
                device=torch.device("cpu"),
                world=World(rank=rank, world_size=world_size),
            )
        except DataError as error:
            outcomes.append(error)
            continue
        outcomes.append([batch["i"].tolist() for batch in batches.epoch(epoch)])
    errors = [outcome for outcome in outcomes if isinstance(outcome, DataError)]
    if errors:
        assert len(errors) == world_size, "a refusal must come from every rank, not one"
        assert all(str(world_size) in str(error) and str(n) in str(error) for error in errors)
        return
    assert len({len(outcome) for outcome in outcomes}) == 1, "ranks must run the same steps"
    seen = [index for outcome in outcomes for batch in outcome for index in batch]
    assert len(seen) == len(set(seen))
    global_batch = batch_size * world_size
    expected = n - n % global_batch if drop_last else n
    assert len(seen) == expected
    assert set(seen) <= set(range(n))


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=20),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float64, torch.float16]), min_size=20),
    bucket_bytes=st.integers(4, 2000),
)
def test_gradient_buckets_partition_parameters_by_dtype_within_the_size_cap(
    sizes: list[int], dtypes: list[torch.dtype], bucket_bytes: int
) -> None:
    tensors = [torch.zeros(size, dtype=dtype) for size, dtype in zip(sizes, dtypes)]
    buckets = _buckets(tensors, bucket_bytes)
    assert sorted(index for bucket in buckets for index in bucket) == list(range(len(sizes)))
    for bucket in buckets:
        assert len({tensors[i].dtype for i in bucket}) == 1
        nbytes = sum(tensors[i].numel() * tensors[i].element_size() for i in bucket)
        assert nbytes <= bucket_bytes or len(bucket) == 1


def test_collectives_are_free_in_one_process() -> None:
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones_like(model.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_gradients(model.parameters(), World())
    broadcast_module(model, World())
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))
    assert model.bias.grad is None
    _assert_bitwise(before, model.state_dict())
    values = torch.tensor([1.0, 2.0])
    assert sum_over_ranks(values, World()) is values
    assert sum_named_over_ranks({"a": torch.tensor(3.0)}, World()) == {"a": 3.0}


@settings(max_examples=60, deadline=None)
@given(world_size=st.integers(2, 64), data=st.data())
def test_launch_environment_reads_torchrun_variables(world_size: int, data: Any) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    local_rank = data.draw(st.integers(0, 7))
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    launch = launch_environment(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (rank, world_size, local_rank)
    assert launch.is_distributed
    without_local = {key: value for key, value in env.items() if key != "LOCAL_RANK"}
    assert launch_environment(without_local).local_rank == rank


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "got 2"),
        ({"WORLD_SIZE": "two"}, "'two'"),
        ({"WORLD_SIZE": "0"}, "got 0"),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
                "LOCAL_RANK": "-1",
            },
            "got -1",
        ),
    ],
)
def test_incomplete_launch_environments_are_clear_errors(env: dict[str, str], named: str) -> None:
    with pytest.raises(DistributedError, match=named):
        launch_environment(env)


def test_a_world_size_without_rendezvous_fails_before_writing_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    config = EngineConfig(epochs=1, batch_size=4, device="cpu", output_dir=tmp_path / "out")
    model = worker.Autoencoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        Engine(strategies.Standard(OptimizerSpec("Adam")), config).fit(model, worker.train_data())
    assert not (tmp_path / "out").exists()
    _assert_bitwise(before, model.state_dict())


def test_one_process_without_a_launcher_is_a_world_of_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with process_group("cpu", 10.0) as world:
        assert world == World()


def test_a_process_group_the_user_made_is_used_and_left_alone(tmp_path: Path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with process_group("cpu", 5.0) as world:
            assert world == World()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [0, -1.5, "10", True, None])
def test_distributed_timeout_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"distributed_timeout_s .*{value!r}"):
        EngineConfig(distributed_timeout_s=value)


def test_a_ready_dataloader_must_shard_itself_under_several_processes() -> None:
    dataset = TensorDataset(torch.arange(10.0))
    world = World(rank=1, world_size=2)
    common: dict[str, Any] = {
        "name": "training",
        "batch_size": 2,
        "shuffle": True,
        "drop_last": False,
        "seed": 0,
        "device": torch.device("cpu"),
        "world": world,
    }
    with pytest.raises(DataError, match=r"2 processes .*SequentialSampler.*DistributedSampler"):
        make_batches(DataLoader(dataset, batch_size=2), **common)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    batches = make_batches(DataLoader(dataset, batch_size=2, sampler=sampler), **common)
    seen = [value for batch in batches.epoch(0) for value in batch[0].tolist()]
    assert seen == [1.0, 3.0, 5.0, 7.0, 9.0]


def test_batch_bounds_give_rank_shares_of_each_global_batch() -> None:
    bounds = [batch_bounds(9, 4, False, World(rank=r, world_size=2)) for r in range(2)]
    assert bounds == [[(0, 4), (8, 9)], [(4, 8), (9, 9)]]

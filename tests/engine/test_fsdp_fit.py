"""``Engine.fit`` with ``parallel="fsdp"``: FSDP2 turned on from ``EngineConfig`` (or TOML),
sharded checkpoints and resume, and the refusals before training.

One spawn of 2 gloo ranks (``tests/engine/fsdp_fit_worker.py``) runs every fit. The guarantees:
the ranks' full parameters agree after every step; FSDP2 follows DDP's trajectory (Standard,
two-phase Adversarial with n_critic 2, gradient clipping on DTensors, an evaluation that leaves
one rank without a batch); a registered model method works sharded; ``resume="last"`` from
sharded checkpoints is bitwise the uninterrupted run; a 2-rank sharded checkpoint resumes in one
process; bad input is refused before the first step, naming it. The kill -9 of both ranks in
the middle of a sharded save is ``test_sharded_checkpoint.py``'s; here ``latest_checkpoint``
(what ``resume="last"`` reads) passes over such a save and over a torn one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import strategies
from engine import ConfigError, Engine, EngineConfig, OptimizerSpec
from engine.checkpoint.format import MARKER, latest_checkpoint
from engine.config.file import read_toml, resolve_config
from engine.events import Event
from tests.engine import fsdp_fit_worker as worker
from tests.engine.test_config_file import vae_config

Results = tuple[list[dict[str, Any]], Path]
GAN = "Adversarial two-phase n_critic 2"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Results:
    folder = tmp_path_factory.mktemp("fsdp-fit")
    return worker.spawn(folder), folder


def _close(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], **tolerance: Any) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], msg=key, **tolerance)


def _without_seconds(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.STRATEGIES))
def test_fsdp_keeps_the_ranks_identical_and_follows_ddps_trajectory(
    ranks: Results, name: str
) -> None:
    (rank0, rank1), _ = ranks
    fsdp, ddp = rank0[name]["fsdp"], rank0[name]["ddp"]
    assert fsdp["sharded"] and not ddp["sharded"]
    assert len(fsdp["digests"]) == 2 * worker.N_TRAIN // (2 * worker.BATCH)
    assert fsdp["digests"] == rank1[name]["fsdp"]["digests"]
    _close(fsdp["params"], ddp["params"], rtol=1e-5, atol=1e-6)
    for sharded, replicated in zip(fsdp["history"], ddp["history"]):
        assert sharded.keys() == replicated.keys()
        for key in sharded:
            if key != "seconds":  # eval/ too: rank 1 ran a zero-weight batch, counted nowhere
                assert sharded[key] == pytest.approx(replicated[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_registered_forward_method_runs_on_the_sharded_model(ranks: Results) -> None:
    (rank0, rank1), _ = ranks
    for name in worker.STRATEGIES:
        sharded, replicated = rank0[name]["fsdp"]["sample"], rank0[name]["ddp"]["sample"]
        torch.testing.assert_close(sharded, replicated, rtol=1e-5, atol=1e-6)
        assert torch.equal(sharded, rank1[name]["fsdp"]["sample"])


@pytest.mark.slow
def test_bf16_under_fsdp_is_bf16_compute_on_fp32_master_weights(ranks: Results) -> None:
    (rank0, rank1), _ = ranks
    bf16, fp32 = rank0["bf16"], rank0["Standard"]["fsdp"]
    assert bf16["digests"] == rank1["bf16"]["digests"]
    assert set(bf16["dtypes"].values()) == {torch.float32}
    _close(bf16["params"], fp32["params"], rtol=0.05, atol=0.02)
    assert any(not torch.equal(bf16["params"][k], v) for k, v in fp32["params"].items())


@pytest.mark.slow
def test_bf16_with_the_discriminator_off_in_the_first_window_and_frozen_by_phase(
    ranks: Results,
) -> None:
    """Two-phase, n_critic 2, bf16: the first window switches the discriminator's update off
    (and the generator's phase is not in it), so nothing moves in step 0; the model that also
    freezes its discriminator in the generator's phase trains bitwise as the one that does not
    (a frozen role's unit keeps its fp32 reduction: ``shard_model`` initialises FSDP2)."""
    (rank0, rank1), _ = ranks
    never, frozen = rank0["switching"][False], rank0["switching"][True]
    for run in (never, frozen):
        assert len(run["digests"]) == worker.N_TRAIN // (2 * worker.BATCH)
        assert run["digests"][0] == run["initial"]  # neither role stepped in window 0
        assert run["digests"][1] != run["initial"]
        assert set(run["dtypes"].values()) == {torch.float32}
    for freeze in (False, True):
        assert rank0["switching"][freeze]["digests"] == rank1["switching"][freeze]["digests"]
    assert frozen["digests"] == never["digests"]
    assert _without_seconds(frozen["history"]) == _without_seconds(never["history"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(1, 2)", "(2, 1)"])
def test_an_hsdp_mesh_trains_as_the_one_dimensional_one(ranks: Results, mesh: str) -> None:
    (rank0, rank1), _ = ranks
    hsdp = rank0["hsdp"][mesh]
    assert hsdp["digests"] == rank1["hsdp"][mesh]["digests"]
    _close(hsdp["params"], rank0["Standard"]["fsdp"]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_last_from_sharded_checkpoints_is_bitwise_the_uninterrupted_run(
    ranks: Results,
) -> None:
    """Saved after epoch 1 (the generator, n_critic 2, stepped 3 of 6 windows), resumed to 3."""
    results, folder = ranks
    for rank in results:
        resumed, reference = rank["resumed"], rank["reference"]
        for key, value in reference["params"].items():
            assert torch.equal(resumed["params"][key], value), key
        assert _without_seconds(resumed["history"]) == _without_seconds(reference["history"])
        assert resumed["digests"] == reference["digests"][-len(resumed["digests"]) :]
    saved = folder / "fsdp" / "checkpoints" / "epoch-0001"
    assert json.loads((saved / MARKER).read_text())["kind"] == "sharded"
    assert sorted(p.name for p in (saved / "shards").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    exported = torch.load(folder / "fsdp" / "model_final.pt", weights_only=True)
    _close(exported, results[0]["resumed"]["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_a_two_rank_sharded_checkpoint_resumes_in_one_process(
    ranks: Results, tmp_path: Path
) -> None:
    """2 ranks -> 1 at an epoch boundary, the global batch kept: one process loads the shards
    whole and ends where the 2 ranks' uninterrupted run did."""
    results, folder = ranks
    run = tmp_path / "fsdp"
    shutil.copytree(folder / "fsdp", run)
    torch.manual_seed(0)
    model = worker.Tiny()
    config = worker.config(epochs=3, batch_size=2 * worker.BATCH, output_dir=tmp_path)
    Engine(worker.STRATEGIES[GAN](), config).fit(
        model, worker.train_data(), worker.eval_data(), resume=run / "checkpoints" / "epoch-0001"
    )
    alone = {name: param.detach() for name, param in model.named_parameters()}
    _close(alone, results[0]["reference"]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_last_passes_over_an_interrupted_and_a_torn_sharded_save(
    ranks: Results, tmp_path: Path
) -> None:
    _, folder = ranks
    run = tmp_path / "fsdp"
    shutil.copytree(folder / "fsdp", run)
    checkpoints = run / "checkpoints"
    expected = latest_checkpoint(run)
    assert expected is not None and expected.name == "last"
    newer = json.loads((expected / "meta.json").read_text())["saved_at_ns"] + 1
    interrupted = checkpoints / ".staging-last-1-1"  # shards on disk, no marker yet
    shutil.copytree(expected, interrupted)
    (interrupted / MARKER).unlink()
    torn = checkpoints / "step-00000099"  # complete, then a shard cut short (a power cut)
    shutil.copytree(expected, torn)
    for copy in (interrupted, torn):
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({**meta, "saved_at_ns": newer}))
    shard = torn / "shards" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-4])
    assert latest_checkpoint(run) == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "kind", "named"),
    [
        ("mesh", "ConfigError", "fsdp_mesh=(3,) holds 3 ranks but the world has 2"),
        ("method", "ConfigError", "FSDP forward method 'generate'"),
        ("block", "ConfigError", "FSDP blocks ['ResBlock'] name no module class of Tiny"),
        ("fp16", "ConfigError", "precision='fp16' is not supported with parallel='fsdp'"),
        ("full under fsdp", "CheckpointError", "is a full checkpoint"),
        ("sharded under ddp", "CheckpointError", "is a sharded checkpoint"),
    ],
)
def test_bad_input_is_refused_on_every_rank_before_the_first_step(
    ranks: Results, case: str, kind: str, named: str
) -> None:
    results, _ = ranks
    for rank in results:
        error, message, steps = rank["refusals"][case]
        assert (error, steps) == (kind, 0), message
        assert named in message
        if kind == "CheckpointError":  # names both kinds
            assert "parallel='fsdp'" in message and "parallel='ddp'" in message
    assert results[0]["after_refusals"]["digests"] == results[1]["after_refusals"]["digests"]


@pytest.mark.slow
def test_each_roles_ddp_is_released_at_the_end_of_fit_while_a_callback_holds_the_run(
    ranks: Results,
) -> None:
    results, _ = ranks
    for rank in results:
        for name in worker.STRATEGIES:
            assert rank[name]["ddp"]["run_kept"]
            assert rank[name]["ddp"]["replicas_released"]


@pytest.mark.slow
def test_the_ddp_log_line_reaches_train_log(ranks: Results) -> None:
    _, folder = ranks
    log = (folder / "ddp" / "Standard" / "train.log").read_text()
    assert "DDP for role 'model': 13 parameters" in log


# ----------------------------------------------------------- one process


def test_fsdp_in_one_process_is_refused_naming_the_launcher_before_any_step(
    tmp_path: Path,
) -> None:
    starts: list[int] = []
    engine = Engine(
        strategies.Standard(OptimizerSpec("Adam")),
        EngineConfig(parallel="fsdp", device="cpu", output_dir=tmp_path, batch_size=4),
    )
    engine.on(Event.BATCH_START, lambda run: starts.append(run.progress.step))
    with pytest.raises(ConfigError, match=r"parallel='fsdp'.*one process.*torchrun"):
        engine.fit(worker.Tiny(), worker.train_data())
    assert starts == [] and list(tmp_path.iterdir()) == []


def test_the_fsdp_fields_load_from_a_config_file() -> None:
    raw = vae_config()
    raw["engine"].update(
        read_toml(
            'parallel = "fsdp"\nfsdp_blocks = ["ResBlock"]\nfsdp_mesh = [2, 4]\n'
            'fsdp_reshard_after_forward = false\nfsdp_forward_methods = ["decoder.sample"]\n'
        )
    )
    engine = resolve_config(raw).engine
    assert (engine.parallel, engine.fsdp_blocks, engine.fsdp_mesh) == (
        "fsdp",
        ("ResBlock",),
        (2, 4),
    )
    assert engine.fsdp_forward_methods == ("decoder.sample",)
    assert engine.fsdp_reshard_after_forward is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parallel", "zero3"),
        ("fsdp_blocks", "ResBlock"),
        ("fsdp_blocks", [""]),
        ("fsdp_mesh", [0, 2]),
        ("fsdp_mesh", [1, 2, 2]),
        ("fsdp_mesh", 2),
        ("fsdp_reshard_after_forward", "yes"),
        ("fsdp_forward_methods", [3]),
    ],
)
def test_a_bad_fsdp_field_is_a_config_error_naming_field_and_value(field: str, value: Any) -> None:
    raw = vae_config()
    raw["engine"][field] = value
    with pytest.raises(ConfigError, match=f"{field} must be") as caught:
        resolve_config(raw)
    shown = repr(tuple(value) if isinstance(value, list) else value)
    assert shown in str(caught.value)

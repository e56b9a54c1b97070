"""Sharded checkpoints (``engine/checkpoint/sharded.py``): DCP inside the engine's atomic,
hash-checked folders.

2 gloo ranks under FSDP2 save after the first window (the generator's optimiser has no state
yet), train on, and fresh ranks resume: bitwise the same ending. The test process loads the
same checkpoint into one unsharded process (2 -> 1) exactly. Two ranks killed with ``kill -9``
in the middle of a save leave the previous checkpoint the one that loads. Foreign, corrupt and
code-carrying checkpoints are refused.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.checkpoint.format import write_checkpoint
from engine.checkpoint.sharded import latest_sharded, load_sharded
from engine.config.specs import OptimizerSpec
from engine.distributed.collectives import World
from engine.errors import CheckpointError
from tests.engine import dcp_worker as worker
from tests.engine.ddp_worker import Gan, free_port
from tests.engine.fsdp_worker import role_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    folder = tmp_path_factory.mktemp("dcp")
    return worker.spawn(folder), folder


def _equal(left: Any, right: Any, where: str = "") -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            _equal(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            _equal(a, b, f"{where}/{index}")
    else:
        assert left == right, where


def one_process(path: Path) -> tuple[Gan, dict[str, torch.optim.Optimizer], Any]:
    torch.manual_seed(5)
    model = Gan()
    adam = OptimizerSpec("Adam", lr=0.02)
    optimizers = {
        role: adam.build(params, torch.device("cpu")) for role, params in role_params(model).items()
    }
    loaded = load_sharded(path, model, optimizers, World())
    return model, optimizers, loaded


@pytest.mark.slow
def test_resuming_on_the_same_ranks_is_bitwise(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    for rank in ranks[0]:
        _equal(rank["after_load"]["params"], rank["at_save"]["params"], "loaded")
        _equal(rank["after_load"]["optimizers"], rank["at_save"]["optimizers"], "loaded optim")
        _equal(rank["resumed"], rank["reference"], "resumed")
        _equal(rank["resumed_optimizers"], rank["reference_optimizers"], "resumed optim")
        assert rank["training_state"] == {"windows": 1, "note": "plain values only"}
        assert max(error for *_, error in rank["resumed_errors"]) <= 1e-6


@pytest.mark.slow
def test_an_optimiser_without_state_has_none_after_loading(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    """n_critic 2: the generator had not stepped when the checkpoint was saved."""
    for rank in ranks[0]:
        assert rank["at_save"]["optimizers"]["generator"] == {}
        sizes = rank["after_load"]["state_sizes"]
        assert sizes["generator"] == 0 and sizes["discriminator"] > 0


@pytest.mark.slow
def test_two_ranks_checkpoint_loads_exactly_in_one_unsharded_process(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    results, folder = ranks
    path = folder / "checkpoints" / "last"
    model, optimizers, loaded = one_process(path)
    saved = results[0]["at_save"]
    _equal({n: p.detach() for n, p in model.named_parameters()}, saved["params"], "params")
    exported = torch.load(path / "model.pt", weights_only=True)
    _equal({k: v for k, v in exported.items() if k in saved["params"]}, saved["params"])
    assert not optimizers["generator"].state
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: s for p, s in optimizers["discriminator"].state.items()}
    _equal(state, saved["optimizers"]["discriminator"]["state"], "discriminator state")
    assert loaded.meta["world_size"] == 2 and loaded.meta["kind"] == "sharded"


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_sharded_save_leaves_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "tests.engine.dcp_worker", "kill", str(tmp_path)]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 240
        flags = [tmp_path / f"shards-written-rank{rank}" for rank in range(2)]
        while not all(flag.exists() for flag in flags):
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the ranks never reached the second save"
            time.sleep(0.1)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    checkpoints = tmp_path / "checkpoints"
    staged = [p for p in checkpoints.iterdir() if p.name.startswith(".staging-B")]
    assert staged and not (staged[0] / "COMPLETE").exists()
    assert (staged[0] / "shards").is_dir()
    found = latest_sharded(checkpoints)
    assert found is not None and found.name == "A"
    model, _, _ = one_process(found)
    expected = torch.load(tmp_path / "A-rank0.pt", weights_only=True)
    _equal({n: p.detach() for n, p in model.named_parameters()}, expected)


@pytest.mark.slow
def test_corrupt_foreign_and_code_carrying_checkpoints_are_refused(
    ranks: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    _, folder = ranks
    source = folder / "checkpoints" / "last"
    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(source, corrupt)
    shard = next((corrupt / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        one_process(corrupt)

    ddp = write_checkpoint(tmp_path / "ddp", ["last"], {"w": torch.ones(1)}, {}, {})[0]
    with pytest.raises(CheckpointError, match="written by a DDP"):
        one_process(ddp)

    evil = tmp_path / "evil"
    shutil.copytree(source, evil)
    payload = pickle.dumps(os.system)  # a global DCP's metadata never names
    (evil / "shards" / ".metadata").write_bytes(payload)
    _rewrite_marker(evil)
    with pytest.raises(CheckpointError, match=r"refused: it names posix\.system"):
        one_process(evil)


def _rewrite_marker(folder: Path) -> None:
    """The marker of an attacker who rewrote a file and its record."""
    import json

    from engine.checkpoint.format import file_record

    marker = json.loads((folder / "COMPLETE").read_text())
    record = file_record(folder / "shards" / ".metadata")
    marker["files"]["shards/.metadata"] = {"size": record.size, "sha256": record.sha256}
    (folder / "COMPLETE").write_text(json.dumps(marker))


class UsedAndUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(3, 3)
        self.unused = torch.nn.Linear(3, 3)


def test_a_parameter_that_never_had_a_gradient_has_no_optimiser_state_after_loading(
    tmp_path: Path,
) -> None:
    """One process, unsharded: ``unused`` never received a gradient, so Adam never made its
    state; torch's loader would give it a fresh one (step 1, zero moments), which changes what
    Adam does the first time it gets a gradient."""

    def build() -> tuple[UsedAndUnused, dict[str, torch.optim.Optimizer]]:
        torch.manual_seed(0)
        model = UsedAndUnused()
        params = list(model.parameters())
        return model, {"model": OptimizerSpec("Adam", lr=0.1).build(params, torch.device("cpu"))}

    from engine.checkpoint.sharded import save_sharded

    model, optimizers = build()
    model.used(torch.randn(2, 3)).sum().backward()
    optimizers["model"].step()
    save_sharded(tmp_path, ["last"], model, optimizers, {}, {}, World())
    fresh, fresh_optimizers = build()
    load_sharded(tmp_path / "last", fresh, fresh_optimizers, World())
    names = {id(p): n for n, p in fresh.named_parameters()}
    assert sorted(names[id(p)] for p in fresh_optimizers["model"].state) == [
        "used.bias",
        "used.weight",
    ]
    _equal(
        {k: v.detach() for k, v in fresh.state_dict().items()},
        {k: v.detach() for k, v in model.state_dict().items()},
    )

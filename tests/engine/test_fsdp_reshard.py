"""FSDP2 with ``fsdp_reshard_after_forward=False``: the engine leaves no unit gathered where a
forward is not followed by a backward (2 gloo ranks, one spawn).

With that setting a forward without backward (the pre-flight forward, an evaluation) leaves each
FSDP unit holding its all-gathered copy, and the model then lists those copies as its
parameters, not the shards the optimisers step. A sharded save matched the optimisers' state to
the model's parameters by name and crashed on every rank (``KeyError: 0``) at the first
checkpoint after an evaluation; a FIT_START callback saw the gathered copies. The guarantees:
such a run (a plain model, eval data, ``Checkpointing``) completes, the model's parameters are
its shards at FIT_START, after each evaluation and at each checkpoint, and it is bitwise the run
with the default resharding (a memory choice, not a change of the math); ``save_sharded`` and
``full_model_state`` reshard a model left gathered by a forward of one's own.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

import callbacks
import strategies
from engine import Engine, EngineConfig, OptimizerSpec, RunState
from engine.checkpoint.format import MODEL_FILE
from engine.checkpoint.sharded import full_model_state, latest_sharded, save_sharded
from engine.checkpoint.state import strategy_optimizers
from engine.distributed.collectives import current_world
from tests.helpers import spawn_ranks

FEATURES = 5
BATCH = 3  # per rank
N_TRAIN = 24  # 4 global batches of 2 x 3 per epoch
N_EVAL = 7  # rank 1's last eval batch is a zero-weight one
EPOCHS = 2


class Plain(nn.Module):
    """An autoencoder with a root parameter (the root's own FSDP unit) and two submodule units;
    nothing but ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, 2))
        self.decoder = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, FEATURES))
        self.scale = nn.Parameter(torch.ones(FEATURES))

    def forward(self, batch: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        recon = self.decoder(torch.tanh(self.encoder(batch))) * self.scale
        return {"loss": (recon - batch).pow(2).mean()}


def train_data() -> torch.Tensor:
    return torch.randn(N_TRAIN, FEATURES, generator=torch.Generator().manual_seed(1))


def eval_data() -> torch.Tensor:
    return torch.randn(N_EVAL, FEATURES, generator=torch.Generator().manual_seed(2))


def all_shards(model: nn.Module) -> bool:
    """Whether every parameter the model lists is a sharded ``DTensor`` (a gathered unit lists
    plain tensors, its all-gathered copies)."""
    return all(isinstance(param, DTensor) for param in model.parameters())


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (collective: every rank calls it)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


class Watcher:
    """Whether the model lists its shards at FIT_START, EVAL_END and EPOCH_END (after the
    other callbacks: ``Checkpointing`` saved by then), and the full parameters after each step."""

    priority = -10

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.shards: list[tuple[str, bool]] = []
        self.trajectory: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, run: RunState) -> None:
        self.shards.append(("fit_start", all_shards(self.model)))

    def on_eval_end(self, run: RunState) -> None:
        self.shards.append(("eval_end", all_shards(self.model)))

    def on_epoch_end(self, run: RunState) -> None:
        self.shards.append(("epoch_end", all_shards(self.model)))

    def on_batch_end(self, run: RunState) -> None:
        self.trajectory.append(full(self.model))


def fit(folder: Path, reshard_after_forward: bool) -> tuple[dict[str, Any], nn.Module, Any]:
    """A 2-epoch FSDP fit of ``Plain`` with evaluation and checkpoints; what it observed (an
    error is recorded, not raised, so that the test names it)."""
    torch.manual_seed(0)
    model = Plain()
    watcher = Watcher(model)
    config = EngineConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        device="cpu",
        output_dir=folder,
        run_name="run",
        distributed_timeout_s=60.0,
        parallel="fsdp",
        fsdp_reshard_after_forward=reshard_after_forward,
    )
    strategy = strategies.Standard(OptimizerSpec("Adam", lr=0.05))
    engine = Engine(
        strategy,
        config,
        [callbacks.Checkpointing(durable=False), watcher],
    )
    error = ""
    history: list[dict[str, float]] = []
    try:
        history = engine.fit(model, train_data(), eval_data()).history
    except Exception as raised:  # (the test names it; the other rank may hang: the deadline)
        error = f"{type(raised).__name__}: {raised}\n{traceback.format_exc()}"
    return (
        {
            "error": error,
            "shards": watcher.shards,
            "trajectory": watcher.trajectory,
            "history": [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history],
            "params": full(model) if not error else {},
            "checkpoint": str(latest_sharded(folder / "run" / "checkpoints")),
        },
        model,
        strategy,
    )


def safety_net(model: nn.Module, folder: Path, strategy: Any) -> dict[str, Any]:
    """After the fit (its optimisers hold state), a forward of one's own (no backward) leaves
    the units gathered; ``full_model_state`` and ``save_sharded`` reshard them first."""
    observed: dict[str, Any] = {}
    model.eval()
    with torch.no_grad():
        model(eval_data())
    observed["gathered_after_forward"] = not all_shards(model)
    observed["full_state"] = full_model_state(model)
    observed["shards_after_full_state"] = all_shards(model)
    with torch.no_grad():
        model(eval_data())
    optimizers = strategy_optimizers(strategy)
    error = ""
    try:
        save_sharded(folder, ["net"], model, optimizers, {}, {}, current_world(), durable=False)
    except Exception as raised:
        error = f"{type(raised).__name__}: {raised}"
    observed["save_error"] = error
    observed["shards_after_save"] = all_shards(model)
    return observed


def scenario(rank: int, folder: Path) -> dict[str, Any]:
    lazy, model, strategy = fit(folder / "lazy", reshard_after_forward=False)
    eager, _, _ = fit(folder / "eager", reshard_after_forward=True)
    return {"lazy": lazy, "eager": eager, "net": safety_net(model, folder / "net", strategy)}


def spawn(folder: Path, world_size: int = 2, deadline_s: float = 120.0) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` gloo ranks; each rank's result, by rank (a hang fails
    after ``deadline_s``: ``tests/helpers.py``'s ``spawn_ranks``)."""
    return spawn_ranks(scenario, folder, world_size, deadline_s)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    folder = tmp_path_factory.mktemp("fsdp-reshard")
    return spawn(folder), folder


@pytest.mark.slow
def test_without_resharding_after_forward_evaluation_and_checkpoints_run_on_the_shards(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    results, _ = ranks
    for rank in results:
        lazy = rank["lazy"]
        assert lazy["error"] == ""
        assert lazy["shards"] == [
            ("fit_start", True),
            *[("eval_end", True), ("epoch_end", True)] * EPOCHS,
        ]
        assert lazy["checkpoint"] != "None"
    saved = torch.load(Path(results[0]["lazy"]["checkpoint"]) / MODEL_FILE, weights_only=True)
    for key, value in results[0]["lazy"]["params"].items():
        assert torch.equal(saved[key], value), key


@pytest.mark.slow
def test_without_resharding_after_forward_the_run_is_bitwise_the_default_one(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    results, _ = ranks
    for rank in results:
        lazy, eager = rank["lazy"], rank["eager"]
        assert eager["error"] == ""
        assert len(lazy["trajectory"]) == EPOCHS * N_TRAIN // (2 * BATCH)
        for step, (left, right) in enumerate(zip(lazy["trajectory"], eager["trajectory"])):
            assert all(torch.equal(left[k], right[k]) for k in left), step
        assert lazy["history"] == eager["history"]
    for key, value in results[0]["lazy"]["params"].items():
        assert torch.equal(results[1]["lazy"]["params"][key], value), key


@pytest.mark.slow
def test_a_sharded_save_reshards_a_model_left_gathered_by_a_forward_of_ones_own(
    ranks: tuple[list[dict[str, Any]], Path],
) -> None:
    results, folder = ranks
    for rank in results:
        net = rank["net"]
        assert net["gathered_after_forward"]  # the situation is real
        assert net["shards_after_full_state"]
        assert net["save_error"] == ""
        assert net["shards_after_save"]
    full_state = results[0]["net"]["full_state"]
    for key, value in results[0]["lazy"]["params"].items():
        assert torch.equal(full_state[key], value), key
    assert (folder / "net" / "net" / MODEL_FILE).is_file()

"""``EMA``, ``SampleGrid``, ``Plots`` and ``QualityMetrics`` under FSDP2 (``parallel="fsdp"``,
2 gloo ranks).

One spawn (``tests/callbacks/fsdp_callbacks_worker.py``) runs every fit. The guarantees: the
sharded EMA, gathered whole, is the EMA of the run's own trajectory (its shards split across the
ranks, no rank holding the whole); a run resumed from sharded checkpoints ends bitwise where the
uninterrupted one did, EMA and pictures too (the uninterrupted run leaves its units gathered
after each forward without backward: were the EMA swapped into the shards under a gathered copy,
its first step after an evaluation would train on the EMA weights and the runs would part);
the pictures are written by rank 0 alone, and equal those one process draws with the same
weights; FID and KID measured in the loop (3 batches on 2 ranks: one rank pads its model calls
to stay in lockstep) are the same on both ranks and equal one process's measure of the same
weights; a model method that would not gather its parameters is refused before the first step,
naming it and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread

import strategies
from engine import Engine, EngineConfig, OptimizerSpec
from engine.state import Progress
from tests.callbacks import fsdp_callbacks_worker as worker
from tests.helpers import run_state_of

Results = tuple[list[dict[str, Any]], Path]
SAMPLES = ["samples_epoch_001.png", "samples_epoch_002.png", "samples_strip.png"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Results:
    folder = tmp_path_factory.mktemp("fsdp-callbacks")
    return worker.spawn(folder), folder


def _equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def _ema_of(trajectory: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The EMA of the full parameters after each step, from the ones at the start."""
    names = list(trajectory[0])
    average = [trajectory[0][name].clone() for name in names]
    for params in trajectory[1:]:
        torch._foreach_lerp_(average, [params[name] for name in names], 1.0 - worker.DECAY)
    return dict(zip(names, average))


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(imread(path))


@pytest.mark.slow
def test_the_sharded_ema_gathered_whole_is_the_ema_of_the_runs_trajectory(
    ranks: Results,
) -> None:
    results, folder = ranks
    whole = results[0]["whole"]
    steps = worker.EPOCHS * worker.N_TRAIN // (2 * worker.BATCH)
    assert len(whole["trajectory"]) == steps + 1
    state = whole["ema_state"]
    assert state["updates"] == steps
    assert all(type(value) is torch.Tensor for value in state["params"].values())
    torch.testing.assert_close(state["params"], _ema_of(whole["trajectory"]), rtol=0, atol=1e-7)
    assert any(not torch.equal(state["params"][k], v) for k, v in whole["params"].items())
    for rank in results:  # every rank gathers the same EMA, and averaged views the same shards
        _equal(rank["whole"]["ema_state"]["params"], state["params"])
        _equal(rank["whole"]["averaged"], state["params"])
    total = sum(value.numel() for value in state["params"].values())
    held = [rank["whole"]["local_numel"] for rank in results]
    assert sum(held) == total and max(held) < total  # each rank keeps its shards only
    exported = torch.load(folder / "whole" / worker.RUN / "model_ema.pt", weights_only=True)
    _equal(exported, state["params"])


@pytest.mark.slow
def test_resume_from_sharded_checkpoints_continues_the_ema_and_pictures_bitwise(
    ranks: Results,
) -> None:
    results, folder = ranks
    for rank in results:
        whole, first, resumed = rank["whole"], rank["first"], rank["resumed"]
        assert first["ema_state"]["updates"] < resumed["ema_state"]["updates"]
        _equal(resumed["params"], whole["params"])
        _equal(resumed["ema_state"]["params"], whole["ema_state"]["params"])
        for key in ("samples_seen", "updates"):
            assert resumed["ema_state"][key] == whole["ema_state"][key]
    for name in SAMPLES:  # the strip's epoch 1 comes from the checkpoint's SampleGrid state
        drawn = _pixels(folder / "resumed" / worker.RUN / "samples" / name)
        assert torch.equal(drawn, _pixels(folder / "whole" / worker.RUN / "samples" / name)), name


@pytest.mark.slow
def test_on_an_hsdp_mesh_the_ema_is_sharded_and_the_same_as_on_the_one_dimensional_one(
    ranks: Results,
) -> None:
    results, _ = ranks
    for rank in results:
        hsdp, flat = rank["hsdp"], rank["first"]
        assert hsdp["local_numel"] == flat["local_numel"]
        torch.testing.assert_close(hsdp["params"], flat["params"], rtol=1e-6, atol=1e-7)
        state = hsdp["ema_state"]["params"]
        torch.testing.assert_close(state, flat["ema_state"]["params"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state, _ema_of(hsdp["trajectory"]), rtol=0, atol=1e-7)


def _draw_alone(folder: Path, end: dict[str, Any]) -> None:
    """The last epoch's pictures, drawn in one process from the weights and EMA a run ended
    with, by the same callbacks."""
    model = worker.TinyImageAE()
    model.load_state_dict(end["params"])
    ema, grid, plots = worker.picture_callbacks()
    engine = Engine(
        strategies.Standard(OptimizerSpec("Adam")),
        EngineConfig(device="cpu", output_dir=folder),
        [ema, grid, plots],
    )
    run = run_state_of(engine, model, folder, Progress(epoch=worker.EPOCHS))
    ema.attach(model)
    ema.load_state_dict(end["ema_state"])
    for callback in (grid, plots):
        callback.on_fit_start(run)
        callback.on_epoch_end(run)


@pytest.mark.slow
def test_rank_0_alone_writes_the_pictures_which_equal_one_process_drawing_the_same_weights(
    ranks: Results, tmp_path: Path
) -> None:
    results, folder = ranks
    run = folder / "whole" / worker.RUN
    assert sorted(p.name for p in (run / "samples").iterdir()) == SAMPLES
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["images.png", "loss_loss.png"]
    assert {"samples", "plots", "model_ema"} <= set(results[0]["whole"]["paths"])
    assert results[1]["whole"]["paths"] == [] and results[1]["whole"]["run_dir"] is None
    assert [list((folder / f"cwd{r}").iterdir()) for r in range(2)] == [[], []]
    _draw_alone(tmp_path, results[0]["whole"])
    for sharded, alone in [
        (run / "samples" / SAMPLES[1], tmp_path / "samples" / SAMPLES[1]),
        (run / "plots" / "images.png", tmp_path / "plots" / "images.png"),
    ]:
        assert torch.equal(_pixels(sharded), _pixels(alone)), sharded.name


def _measure_alone(params: dict[str, torch.Tensor]) -> dict[str, float]:
    """What the quality callbacks measure in one process on a model with ``params``."""
    model = worker.TinyImageAE()
    model.load_state_dict(params)
    engine = Engine(strategies.Standard(OptimizerSpec("Adam")), EngineConfig(device="cpu"))
    run = run_state_of(engine, model)
    measured: dict[str, float] = {}
    for quality in worker.quality_callbacks():
        measured.update(quality.measure(run))
    return measured


@pytest.mark.slow
def test_quality_metrics_in_lockstep_equal_one_process_measuring_the_same_weights(
    ranks: Results,
) -> None:
    results, _ = ranks
    epochs = results[0]["quality"]
    assert len(epochs) == worker.EPOCHS
    names = {f"{prefix}/{name}" for prefix in ("eval", "recon") for name in ("fid", "kid")}
    for epoch, end in enumerate(epochs):
        assert set(end["metrics"]) == names | {"eval/kid_std", "recon/kid_std"}
        assert results[1]["quality"][epoch]["metrics"] == end["metrics"]
        _equal(results[1]["quality"][epoch]["params"], end["params"])
        alone = _measure_alone(end["params"])
        for name in names:
            assert end["metrics"][name] == pytest.approx(alone[name], rel=1e-6, abs=1e-9), name
    assert epochs[0]["metrics"]["eval/fid"] != epochs[1]["metrics"]["eval/fid"]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("QualityMetrics sample", "fsdp_forward_methods=['sample']"),
        ("SampleGrid sample", "fsdp_forward_methods=['sample']"),
        ("Plots sample", "fsdp_forward_methods=['sample']"),
        ("SampleGrid submodule", "fsdp_blocks=['Linear']"),
    ],
)
def test_a_method_that_would_not_gather_its_parameters_is_refused_before_the_first_step(
    ranks: Results, case: str, named: str
) -> None:
    results, _ = ranks
    for rank in results:
        error, message, steps = rank["refusals"][case]
        assert (error, steps) == ("ConfigError", 0), message
        who, method = case.split()
        assert message.startswith(f"{who}: method ") and named in message
        assert ("'sample'" if method == "sample" else "'encoder.1'") in message

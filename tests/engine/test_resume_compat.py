"""Resume compatibility (engine/checkpoint/state.py): another optimiser class or other parameter
groups for a role are refused before anything changes; optimiser arguments changed in the config
are applied to the restored optimiser and logged; an unchanged config resumes exactly. And the
Python API is reproducible: ``Engine(...)`` seeds, so the README's tour run twice in fresh
processes ends with identical weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import Checkpointing
from engine import CheckpointError, Engine, EngineConfig, OptimizerSpec, SchedulerSpec
from engine.checkpoint.format import LoadedCheckpoint, latest_checkpoint, load_checkpoint
from engine.checkpoint.state import restore_training
from engine.run_setup import make_context
from strategies import Standard
from tests.engine.checkpoint_cases import DropoutRegressor, data

ROOT = Path(__file__).resolve().parents[2]


def _fit(
    tmp: Path,
    optimizer: OptimizerSpec,
    epochs: int,
    resume: Any = None,
    scheduler: SchedulerSpec | None = None,
) -> tuple[Engine, torch.nn.Module]:
    engine = Engine(
        Standard(optimizer, scheduler=scheduler),
        EngineConfig(epochs=epochs, batch_size=4, device="cpu", output_dir=tmp, run_name="run"),
        [Checkpointing(best_k=0, durable=False)],
    )
    model = DropoutRegressor()
    engine.fit(model, data(8), resume=resume)
    return engine, model


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _lr(engine: Engine) -> float:
    return engine.strategy.learning_rates()["lr/model"]


def test_another_optimiser_class_is_refused_naming_role_and_both_classes(tmp_path: Path) -> None:
    _fit(tmp_path, OptimizerSpec("Adam", lr=1e-2), epochs=1)
    before = _files(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"role 'model' was trained with optimiser Adam.*SGD"):
        _fit(tmp_path, OptimizerSpec("SGD", lr=1e-2, momentum=0.9), epochs=2, resume="last")
    assert _files(tmp_path / "run") == before


def test_other_hyperparameter_names_are_refused_where_the_class_is_not_recorded(
    tmp_path: Path,
) -> None:
    """A checkpoint without the class names (written before they were recorded): the names of
    the saved parameter groups' hyperparameters still tell another class."""
    _fit(tmp_path, OptimizerSpec("Adam", lr=1e-2), epochs=1)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    meta = {key: value for key, value in saved.meta.items() if key != "optimizers"}
    older = LoadedCheckpoint(saved.path, meta, saved.model_state, saved.training_state)
    model, strategy = DropoutRegressor(), Standard(OptimizerSpec("SGD", lr=1e-2, momentum=0.9))
    config = EngineConfig(batch_size=4, device="cpu", output_dir=None)
    ctx = make_context(config, torch.device("cpu"), _progress(), _world(), _forward)
    strategy.setup(model, ctx)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"updates\.model\.optimizer.*another optimiser class"
    ):
        restore_training(older, model, strategy, ctx, [], config)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def _progress() -> Any:
    from engine.state import Progress

    return Progress()


def _world() -> Any:
    from engine import World

    return World()


def _forward(model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
    return model(batch, **kwargs)


@settings(max_examples=6, deadline=None)
@given(old=st.sampled_from([1e-3, 1e-2]), new=st.sampled_from([3e-3, 5e-2]))
def test_a_changed_lr_is_applied_to_the_restored_optimiser_and_logged(
    tmp_path_factory: pytest.TempPathFactory, old: float, new: float
) -> None:
    tmp = tmp_path_factory.mktemp("lr")
    _fit(tmp, OptimizerSpec("Adam", lr=old), epochs=1)
    engine, _ = _fit(tmp, OptimizerSpec("Adam", lr=new, weight_decay=0.1), epochs=2, resume="last")
    assert _lr(engine) == new
    state = engine.strategy.state_dict()["updates"]["model"]["optimizer"]["param_groups"][0]
    assert state["weight_decay"] == 0.1
    log = (tmp / "run" / "train.log").read_text()
    assert re.search(rf"role 'model' optimiser arguments changed.*lr {old!r} -> {new!r}", log)
    assert "weight_decay None -> 0.1" in log


def test_an_unchanged_config_keeps_the_learning_rate_its_scheduler_reached(tmp_path: Path) -> None:
    halve = SchedulerSpec("StepLR", step_size=1, gamma=0.5)
    _fit(tmp_path, OptimizerSpec("Adam", lr=0.08), epochs=2, scheduler=halve)
    engine, _ = _fit(tmp_path, OptimizerSpec("Adam", lr=0.08), 3, resume="last", scheduler=halve)
    assert _lr(engine) == pytest.approx(0.01)  # three halvings: the schedule went on
    assert "optimiser arguments changed" not in (tmp_path / "run" / "train.log").read_text()


def test_a_changed_lr_with_a_scheduler_restarts_the_schedule_from_it(tmp_path: Path) -> None:
    halve = SchedulerSpec("StepLR", step_size=1, gamma=0.5)
    _fit(tmp_path, OptimizerSpec("Adam", lr=0.08), epochs=2, scheduler=halve)
    engine, _ = _fit(tmp_path, OptimizerSpec("Adam", lr=0.4), 3, resume="last", scheduler=halve)
    assert _lr(engine) == pytest.approx(0.2)  # the new lr, halved by the third epoch's step
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    scheduler = load_checkpoint(checkpoint).training_state["strategy"]["updates"]["model"]
    assert scheduler["scheduler"]["base_lrs"] == [0.4]


def test_the_readme_tour_gives_identical_weights_in_two_fresh_processes(tmp_path: Path) -> None:
    """The tour as the README shows it (its last two lines, which name undefined ``model`` and
    ``data``, left out), run twice; the trained VAE's weights and metrics are compared."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A tour of the API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = tour.split("engine.evaluate(model", 1)[0]
    imports, rest = code.split("engine = Engine(", 1)
    script = (
        imports
        + "import sys, torch\n_built = []\n_VAE = VAE\n"
        + "def VAE(*args, **kwargs):\n    _built.append(_VAE(*args, **kwargs))\n"
        + "    return _built[-1]\n"
        + "engine = Engine("
        + rest
        + "\ntorch.save({'weights': _built[0].state_dict(), 'history': result.history}, "
        + "sys.argv[1])\n"
    )
    (tmp_path / "tour.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = []
    for index in range(2):
        target = tmp_path / f"out{index}.pt"
        done = subprocess.run(
            [sys.executable, "tour.py", str(target)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(torch.load(target, weights_only=True))
    first, second = outputs
    assert first["weights"].keys() == second["weights"].keys()
    assert all(torch.equal(first["weights"][k], second["weights"][k]) for k in first["weights"])
    strip = [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in first["history"]]
    again = [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in second["history"]]
    assert strip == again

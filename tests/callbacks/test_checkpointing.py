"""``Checkpointing``: which folders it keeps, when it saves, what it refuses to save."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import Checkpointing, EarlyStopping
from engine import (
    ConfigError,
    Engine,
    EngineConfig,
    NonFiniteLossError,
    OptimizerSpec,
    RunState,
)
from engine.checkpoint.format import load_checkpoint
from engine.context import ForwardFn
from strategies import Standard
from tests.engine.checkpoint_cases import DropoutRegressor, data, equal


def _engine(
    tmp: Path, callbacks: list[Any], forward: ForwardFn | None = None, **config: Any
) -> Engine:
    settings_ = {
        "epochs": 2,
        "batch_size": 4,
        "device": "cpu",
        "output_dir": tmp,
        "run_name": "run",
    }
    settings_.update(config)
    return Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)), EngineConfig(**settings_), callbacks, forward
    )


def _names(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir())


def _step_of(path: Path) -> int:
    return int(load_checkpoint(path).meta["progress"]["step"])


class Scores:
    """Sets ``run.epoch_metrics["score"]`` to the epoch's given value (before checkpointing)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_epoch_end(self, run: RunState) -> None:
        run.epoch_metrics["score"] = self.values[run.progress.epoch - 1]

    def metric_names(self) -> tuple[str, ...]:
        """The name it adds, declared so that the pre-flight stage resolves the monitor."""
        return ("score",)


@settings(max_examples=8, deadline=None)
@given(epochs=st.integers(1, 4), keep=st.sampled_from([None, 0, 1, 2]))
def test_keep_periodic_keeps_exactly_the_newest(
    tmp_path_factory: pytest.TempPathFactory, epochs: int, keep: int | None
) -> None:
    tmp = tmp_path_factory.mktemp("keep")
    checkpointing = Checkpointing(keep_periodic=keep, best_k=0, durable=False)
    _engine(tmp, [checkpointing], epochs=epochs).fit(DropoutRegressor(), data(8))
    kept = range(1, epochs + 1) if keep is None else range(epochs - keep + 1, epochs + 1)
    assert _names(tmp) == sorted(["last", *(f"epoch-{e:04d}" for e in kept if e >= 1)])


@settings(max_examples=10, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=5),
    k=st.integers(1, 3),
    mode=st.sampled_from(["min", "max"]),
)
def test_best_k_keeps_exactly_the_best_epochs(
    tmp_path_factory: pytest.TempPathFactory, values: list[float], k: int, mode: str
) -> None:
    tmp = tmp_path_factory.mktemp("best")
    checkpointing = Checkpointing(
        every_n_epochs=None, best_k=k, monitor="score", mode=mode, durable=False
    )
    _engine(tmp, [Scores(values), checkpointing], epochs=len(values)).fit(
        DropoutRegressor(), data(8)
    )
    order = sorted(
        range(len(values)), key=lambda e: (values[e] if mode == "min" else -values[e], e)
    )
    best = [f"best-epoch-{e + 1:04d}" for e in order[:k]]
    assert [n for n in _names(tmp) if n.startswith("best-")] == sorted(best)
    winner = tmp / "run" / "checkpoints" / best[0]
    exported = torch.load(tmp / "run" / "model_best.pt", weights_only=True)
    assert equal(exported, load_checkpoint(winner).model_state)


def test_every_n_steps_saves_at_those_steps(tmp_path: Path) -> None:
    checkpointing = Checkpointing(every_n_epochs=None, every_n_steps=3, best_k=0, durable=False)
    _engine(tmp_path, [checkpointing], epochs=2).fit(DropoutRegressor(), data(8))
    assert _names(tmp_path) == ["last", "step-00000003"]
    assert _step_of(tmp_path / "run" / "checkpoints" / "last") == 4


def test_exports_final_weights_and_the_model_config(tmp_path: Path) -> None:
    model = DropoutRegressor()
    result = _engine(tmp_path, [Checkpointing(durable=True)]).fit(model, data(8))
    run_dir = tmp_path / "run"
    assert equal(torch.load(run_dir / "model_final.pt", weights_only=True), model.state_dict())
    assert json.loads((run_dir / "model_config.json").read_text()) == model.config
    assert result.paths["model_final"] == run_dir / "model_final.pt"
    assert result.paths["checkpoint"] == run_dir / "checkpoints" / "last"


class FailAt:
    """Raises ``error`` in a BATCH_END handler (after the step completed) at ``step``."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step == self.step:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_after_a_completed_step_saves_last_at_that_step(
    tmp_path: Path, error: BaseException
) -> None:
    callbacks = [FailAt(3, error), Checkpointing(best_k=0, durable=False)]
    with pytest.raises(type(error)):
        _engine(tmp_path, callbacks).fit(DropoutRegressor(), data(8))
    assert _step_of(tmp_path / "run" / "checkpoints" / "last") == 3


class FailingForward:
    """The engine's forward, raising (inside ``train_step``) at call ``fail_at``."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("failure inside the step")
        return model(batch, **kwargs)


def test_an_error_inside_train_step_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    callbacks = [Checkpointing(every_n_steps=2, best_k=0, durable=False)]
    with pytest.raises(RuntimeError, match="failure inside the step"):
        _engine(tmp_path, callbacks, FailingForward(fail_at=4)).fit(DropoutRegressor(), data(8))
    assert _step_of(tmp_path / "run" / "checkpoints" / "last") == 2


class CtrlCAt:
    """The engine's forward, sending the process SIGINT (as Ctrl-C does) at call ``at``."""

    def __init__(self, at: int) -> None:
        self.calls, self.at = 0, at

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        self.calls += torch.is_grad_enabled()  # the pre-flight forward (no_grad) is no step
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return model(batch, **kwargs)


@pytest.mark.parametrize("hold", [True, False])
def test_ctrl_c_inside_a_step_is_held_until_the_step_ends_and_saved(
    tmp_path: Path, hold: bool
) -> None:
    """Held, the interrupt surfaces after step 3 completed and ``last`` is step 3; not held, it
    lands inside step 3 and the step-2 checkpoint stays the last one."""
    checkpointing = Checkpointing(every_n_steps=2, best_k=0, durable=False, hold_interrupts=hold)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path, [checkpointing], CtrlCAt(at=3)).fit(DropoutRegressor(), data(16))
    assert signal.getsignal(signal.SIGINT) is before
    assert _step_of(tmp_path / "run" / "checkpoints" / "last") == (3 if hold else 2)


class NanAfter:
    """The engine's forward, returning a NaN loss from call ``nan_at`` on."""

    def __init__(self, nan_at: int) -> None:
        self.calls, self.nan_at = 0, nan_at

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        self.calls += torch.is_grad_enabled()  # the pre-flight forward (no_grad) is no step
        outputs = model(batch, **kwargs)
        if self.calls >= self.nan_at:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs


def test_a_nonfinite_loss_leaves_the_last_good_checkpoint_intact(tmp_path: Path) -> None:
    """The loss turns NaN at step 3 and is read at step 4 (log_every=4): the saves due at
    steps 3 and 4 are skipped, and no checkpoint holds the poisoned weights."""
    callbacks = [Checkpointing(every_n_steps=1, best_k=0, durable=False)]
    with pytest.raises(NonFiniteLossError):
        _engine(tmp_path, callbacks, NanAfter(nan_at=3), log_every=4).fit(
            DropoutRegressor(), data(16)
        )
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _step_of(checkpoints / "last") == 2
    for path in checkpoints.iterdir():
        state = load_checkpoint(path).model_state
        assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_an_epoch_save_holds_early_stopping_after_its_update(tmp_path: Path) -> None:
    stopping = EarlyStopping(patience=100, min_delta=1e9)
    callbacks = [Checkpointing(best_k=0, durable=False), stopping]
    _engine(tmp_path, callbacks, epochs=3).fit(DropoutRegressor(), data(8))
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch-0002")
    assert saved.training_state["callbacks"]["EarlyStopping"]["bad_epochs"] == 1
    assert stopping.bad_epochs == 2


class NotMain:
    """Makes the run look like a rank other than 0 to the handlers after it."""

    priority = 10

    def on_fit_start(self, run: RunState) -> None:
        run.is_main_process = False


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    _engine(tmp_path, [NotMain(), Checkpointing(durable=False)]).fit(DropoutRegressor(), data(8))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "model_final.pt").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive integer or None, got 0"),
        ({"every_n_steps": 1.5}, "every_n_steps must be a positive integer or None, got 1.5"),
        ({"keep_periodic": -1}, "keep_periodic must be a non-negative integer, got -1"),
        ({"best_k": -2}, "best_k must be a non-negative integer, got -2"),
        ({"mode": "avg"}, "mode must be one of ['min', 'max', None], got 'avg'"),
        ({"monitor": ""}, "monitor must be a metric name such as 'eval/loss', got ''"),
        ({"directory": "a/b"}, "directory must be a plain folder name, got 'a/b'"),
        ({"durable": 1}, "durable must be true or false, got 1"),
        ({"background": "yes"}, "background must be true, false or None, got 'yes'"),
    ],
)
def test_bad_options_are_refused_naming_them(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Checkpointing(**options)
    assert str(caught.value) == message


def test_a_monitor_missing_from_the_metrics_is_an_error_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"monitors 'train/nope'.*\['epoch'"):
        _engine(tmp_path, [Checkpointing(monitor="train/nope", durable=False)]).fit(
            DropoutRegressor(), data(8)
        )
    # The pre-flight stage refuses the name before the first step and before any file.
    assert not (tmp_path / "run").exists()


class FailsInEval:
    """The engine's forward, raising in evaluation (``model.training`` is False) after the
    pre-flight forward (the first one in eval mode) passed."""

    def __init__(self) -> None:
        self.eval_calls = 0

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        self.eval_calls += not model.training
        if self.eval_calls > 1:
            raise RuntimeError("failure in evaluation")
        return model(batch, **kwargs)


def test_an_error_during_the_epochs_end_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """The epoch's train means are already taken when evaluation runs: no save there."""
    callbacks = [Checkpointing(every_n_steps=1, best_k=0, durable=False)]
    with pytest.raises(RuntimeError, match="failure in evaluation"):
        _engine(tmp_path, callbacks, FailsInEval()).fit(DropoutRegressor(), data(8), data(4))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert last.meta["progress"] == {"epoch": 0, "step": 2, "batch_in_epoch": 2, "skipped_steps": 0}


def test_a_new_run_does_not_inherit_the_previous_runs_best(tmp_path: Path) -> None:
    checkpointing = Checkpointing(every_n_epochs=None, monitor="score", durable=False)
    _engine(tmp_path, [Scores([0.1]), checkpointing], epochs=1).fit(DropoutRegressor(), data(8))
    _engine(tmp_path, [Scores([5.0]), checkpointing], epochs=1, run_name="second").fit(
        DropoutRegressor(), data(8)
    )
    assert (tmp_path / "second" / "model_best.pt").exists()
    assert checkpointing.best_value == 5.0

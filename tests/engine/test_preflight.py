"""engine/preflight.py: every mistake it can see is our error before the first step and before
any file is written, and its forward changes nothing of training."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from callbacks import Checkpointing, EarlyStopping
from engine import (
    ConfigError,
    DataError,
    Engine,
    EngineConfig,
    Event,
    ModelOutputError,
    OptimizerSpec,
    SchedulerSpec,
    StepContext,
    World,
)
from engine.preflight import SUPPORTS_ALL, default_monitor, first_forward
from engine.run_setup import make_context
from engine.state import Progress
from strategies import Adversarial, CoupledAdversarial, Standard
from strategies.update import UpdateSpec, apply_updates, backward_isolated, build_update
from tests.helpers import EventRecorder, TinyRegressor, same_tensors, snapshot


def _engine(tmp: Path | None, strategy: Any = None, callbacks: Any = (), **config: Any) -> Engine:
    settings_ = {"epochs": 2, "batch_size": 4, "device": "cpu", "output_dir": tmp, "run_name": "r"}
    settings_.update(config)
    strategy = strategy or Standard(OptimizerSpec("Adam", lr=1e-2))
    return Engine(strategy, EngineConfig(**settings_), [*callbacks])


def _refused_before_any_step(
    engine: Engine, error: type[BaseException], match: str, *data: Any, model: Any = None
) -> None:
    """``fit`` raises ``error`` before BATCH_START, and no run folder appears."""
    recorder = EventRecorder()
    engine.bus.add_all([recorder])
    root = engine.config.output_dir
    before = sorted(root.iterdir()) if root is not None and root.is_dir() else []
    with pytest.raises(error, match=match):
        engine.fit(model or TinyRegressor(), *(data or (torch.randn(16, 4),)))
    assert recorder.count(Event.BATCH_START) == 0
    after = sorted(root.iterdir()) if root is not None and root.is_dir() else []
    assert after == before


# ----------------------------------------------------------------------------- names


class Scores:
    """Adds ``eval/fid`` to each epoch's metrics, and declares it."""

    def on_epoch_end(self, run: Any) -> None:
        run.epoch_metrics["eval/fid"] = 1.0 / run.progress.epoch

    def metric_names(self) -> tuple[str, ...]:
        return ("eval/fid",)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: _engine(t, monitor="train/los"), r"EngineConfig.*'train/los'.*'train/loss'"),
        (lambda t: _engine(t, monitor="eval/loss"), r"'eval/loss'.*never evaluates"),
        (
            lambda t: _engine(
                t,
                Standard(
                    OptimizerSpec("Adam"),
                    scheduler=SchedulerSpec("ReduceLROnPlateau", monitor="eval/loss"),
                ),
            ),
            r"model scheduler ReduceLROnPlateau monitors 'eval/loss'.*never evaluates",
        ),
        (
            lambda t: _engine(
                t,
                Standard(
                    OptimizerSpec("Adam"),
                    scheduler=SchedulerSpec("ReduceLROnPlateau", monitor="train/lss"),
                ),
            ),
            r"ReduceLROnPlateau monitors 'train/lss'",
        ),
        (
            lambda t: _engine(t, callbacks=[EarlyStopping(monitor="train/los")]),
            r"EarlyStopping monitors 'train/los'.*did you mean 'train/loss'",
        ),
        (
            lambda t: _engine(t, callbacks=[Checkpointing(monitor="eval/fid")]),
            r"Checkpointing monitors 'eval/fid'",
        ),
    ],
)
def test_a_name_the_run_does_not_produce_is_refused_before_any_step(
    tmp_path: Path, make: Any, match: str
) -> None:
    _refused_before_any_step(make(tmp_path), ConfigError, match)


def test_a_name_a_callback_declares_is_accepted_without_eval_data(tmp_path: Path) -> None:
    checkpointing = Checkpointing(monitor="eval/fid", mode="max", durable=False)
    result = _engine(tmp_path, callbacks=[Scores(), checkpointing]).fit(
        TinyRegressor(), torch.randn(16, 4)
    )
    assert (result.run_dir / "model_best.pt").is_file()
    assert checkpointing.best_value == 1.0


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (Standard(OptimizerSpec("Adam"), loss_key="los"), r"no loss 'los'.*keys present"),
        (Standard(OptimizerSpec("Adam"), metrics=("predictin",)), r"no loss 'predictin'"),
    ],
)
def test_a_loss_key_or_metric_typo_is_refused_before_any_step(
    tmp_path: Path, strategy: Any, match: str
) -> None:
    _refused_before_any_step(_engine(tmp_path, strategy), ModelOutputError, match)


def test_standard_refuses_metrics_given_as_a_string() -> None:
    with pytest.raises(ConfigError, match=r"metrics must be a tuple of output names.*'reg_loss'"):
        Standard(OptimizerSpec("Adam"), metrics="reg_loss")  # type: ignore[arg-type]


def test_standard_refuses_a_loss_without_grad_fn_naming_key_and_step(tmp_path: Path) -> None:
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
            return {"loss": self.linear(x).pow(2).mean().detach()}

    with pytest.raises(ModelOutputError, match=r"loss 'loss' .*no grad_fn\) at step 0"):
        _engine(None).fit(Detached(), torch.randn(8, 4))


# ----------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: OptimizerSpec("Adam", lr=-1), r"argument lr=-1 is refused.*Invalid learning rate"),
        (lambda: OptimizerSpec("Adam", lr="1e-2"), r"lr='1e-2' must be a number.*without quotes"),
        (lambda: OptimizerSpec("Adam", betas=0.9), r"betas=0.9 must be 2 numbers"),
        (lambda: OptimizerSpec("SGD", lr=0.1, momentum=-1), r"momentum=-1 is refused"),
        (lambda: SchedulerSpec("StepLR"), r"'StepLR' needs argument\(s\) \['step_size'\]"),
        (lambda: SchedulerSpec("StepLR", step_size="a"), r"step_size='a' must be a number"),
        (lambda: SchedulerSpec("ExponentialLR", gamma="x"), r"gamma='x' must be a number"),
        (lambda: SchedulerSpec("ReduceLROnPlateau", monitor="m", factor=2), r"factor=2"),
    ],
)
def test_bad_optimiser_and_scheduler_values_name_the_argument_and_the_value(
    make: Any, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_a_scheduler_that_needs_what_the_roles_optimiser_lacks_names_the_role(
    tmp_path: Path,
) -> None:
    """CyclicLR cycles a momentum; Adagrad has none (the spec's own check, on SGD, passes)."""
    cyclic = SchedulerSpec("CyclicLR", base_lr=0.01, max_lr=0.1, interval="step")
    strategy = Standard(OptimizerSpec("Adagrad", lr=0.01), scheduler=cyclic)
    _refused_before_any_step(_engine(tmp_path, strategy), ConfigError, r"role 'model': scheduler")


# ----------------------------------------------------------------------------- data


def test_integer_images_are_named_with_how_to_convert(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (16, 4), dtype=torch.uint8)
    _refused_before_any_step(
        _engine(tmp_path), DataError, r"tensor: torch.uint8 \(4, 4\).*float\(\) / 255", images
    )


def test_a_shape_the_model_refuses_is_named_with_the_batch(tmp_path: Path) -> None:
    _refused_before_any_step(
        _engine(tmp_path), DataError, r"first training batch \(tensor: torch.float32 \(4, 5\)\)",
        torch.randn(16, 5),
    )  # fmt: skip


def test_a_python_list_of_tensors_is_refused(tmp_path: Path) -> None:
    samples = [torch.randn(4) for _ in range(16)]
    _refused_before_any_step(
        _engine(tmp_path), DataError, r"Python list of 16 item\(s\).*torch.stack", samples
    )


@pytest.mark.parametrize("seed", [time.time_ns(), 2**40 + 1, -(2**40) - 1, 1.0, "0"])
def test_a_seed_out_of_range_is_refused(seed: Any) -> None:
    with pytest.raises(ConfigError, match=r"seed must be an integer between -2\*\*40 and 2\*\*40"):
        EngineConfig(seed=seed)


# ----------------------------------------------------------------------------- output folder


def test_an_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    engine = _engine(blocker / "runs")
    with pytest.raises(ConfigError, match=r"output_dir .*file/runs.* is a file"):
        engine.fit(TinyRegressor(), torch.randn(8, 4))
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            _engine(folder).fit(TinyRegressor(), torch.randn(8, 4))
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------- custom strategies


class Custom:
    """A hand-written strategy over ``Standard``'s parts; ``metric`` makes its metrics."""

    def __init__(self, metric: Any = None, supports: frozenset[str] = frozenset()) -> None:
        self.metric, self.supports = metric, supports
        self.update: Any = None

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return ("loss",)

    def setup(self, model: nn.Module, ctx: StepContext) -> None:
        spec = UpdateSpec("model", "loss", OptimizerSpec("SGD", lr=0.01))
        self.update = build_update(spec, list(model.parameters()), ctx.device)

    def train_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> Mapping[str, Any]:
        loss = ctx.read_loss(ctx.forward(model, batch), "loss")
        backward_isolated([(self.update, loss)], ctx, every_group=True)
        apply_updates([self.update], ctx)
        return self._metrics(loss)

    def eval_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> Mapping[str, Any]:
        return self._metrics(ctx.read_loss(ctx.forward(model, batch), "loss"))

    def _metrics(self, loss: torch.Tensor) -> dict[str, Any]:
        metrics: dict[str, Any] = {"loss": loss.detach()}
        if self.metric is not None:
            metrics["extra"] = self.metric(loss)
        return metrics

    def predict_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> Mapping[str, Any]:
        return ctx.forward(model, batch)

    def end_epoch(self, metrics: Mapping[str, float], ctx: StepContext) -> None:
        pass

    def learning_rates(self) -> dict[str, float]:
        return {"lr/model": float(self.update.optimizer.param_groups[0]["lr"])}

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.update.load_state_dict(state["update"])


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        (lambda loss: float(loss), r"metric 'extra' must be a 0-d tensor, got a float"),
        (lambda loss: loss.detach().repeat(4), r"metric 'extra' .*shape \(4,\)"),
    ],
)
def test_a_custom_metric_that_is_not_a_0d_tensor_is_refused_naming_it(
    tmp_path: Path, metric: Any, match: str
) -> None:
    _refused_before_any_step(_engine(tmp_path, Custom(metric)), ModelOutputError, match)


@pytest.mark.parametrize("supports", [frozenset(), SUPPORTS_ALL])
def test_settings_a_strategy_does_not_declare_are_warned_about(
    tmp_path: Path, supports: frozenset[str]
) -> None:
    engine = _engine(tmp_path, Custom(supports=supports), accumulate_steps=2, grad_clip_norm=1.0)
    result = engine.fit(TinyRegressor(), torch.randn(16, 4))
    log = (result.run_dir / "train.log").read_text()
    warned = "does not declare that it honours accumulate_steps=2" in log
    assert warned == (not supports)
    assert ("grad_clip_norm=1.0" in log) == (not supports)


# ----------------------------------------------------------------------------- GANs


def test_a_strategy_whose_loss_is_no_quality_measure_keeps_no_best(tmp_path: Path) -> None:
    strategy = Custom()
    strategy.loss_is_quality = False  # type: ignore[attr-defined]
    result = _engine(tmp_path, strategy, [Checkpointing(durable=False)]).fit(
        TinyRegressor(), torch.randn(16, 4)
    )
    assert result.monitor is None and result.best_value is None
    assert not (result.run_dir / "model_best.pt").exists()
    named = Checkpointing(monitor="train/loss", durable=False)
    again = _engine(tmp_path, strategy, [named], run_name="named").fit(
        TinyRegressor(), torch.randn(16, 4)
    )
    assert (again.run_dir / "model_best.pt").is_file()


def test_adversarial_strategies_monitor_nothing_by_default() -> None:
    adam = OptimizerSpec("Adam")
    for two_phase in (False, True):
        assert default_monitor(Adversarial(adam, adam, two_phase=two_phase), True) is None
    vaegan = CoupledAdversarial(encoder=adam, decoder=adam, discriminator=adam)
    assert default_monitor(vaegan, True) is None


def test_best_k_0_writes_no_model_best(tmp_path: Path) -> None:
    result = _engine(tmp_path, callbacks=[Checkpointing(best_k=0, durable=False)]).fit(
        TinyRegressor(), torch.randn(16, 4)
    )
    assert (result.run_dir / "model_final.pt").is_file()
    assert not (result.run_dir / "model_best.pt").exists()


# ----------------------------------------------------------------------------- no state changes


class Noisy(nn.Module):
    """Dropout, batch norm and a random draw in its forward: every kind of state a forward
    could touch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        y = self.dropout(self.norm(self.linear(x))) + 0.01 * torch.randn_like(x)
        return {"loss": (y - x).pow(2).mean()}


@settings(max_examples=10, deadline=None)
@given(training=st.booleans(), with_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_the_preflight_forward_changes_no_state(training: bool, with_grad: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model, strategy = Noisy(), Standard(OptimizerSpec("Adam", lr=0.1))
    config = EngineConfig(device="cpu", output_dir=None, eval_with_grad=with_grad)
    ctx = make_context(config, torch.device("cpu"), Progress(), World(), _call)
    strategy.setup(model, ctx)
    model.train(training)
    batch = torch.randn(8, 4)
    weights, optimizer, rng = snapshot(model), strategy.state_dict(), torch.get_rng_state()
    metrics = first_forward(strategy, model, batch, ctx)
    assert set(metrics) == {"loss"} and metrics["loss"].ndim == 0
    assert model.training == training
    assert same_tensors(weights, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert strategy.state_dict() == optimizer
    assert all(p.grad is None for p in model.parameters())


def _call(model: nn.Module, batch: Any, **kwargs: Any) -> Any:
    return model(batch, **kwargs)


# ----------------------------------------------------------------------------- README


def _readme_strategy() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Writing a strategy", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_readme_strategy_trains_resumes_and_honours_accumulation_and_clipping(
    tmp_path: Path,
) -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(_readme_strategy(), "README.md", "exec"), namespace)
    make = namespace["Denoising"]

    def fit(epochs: int, resume: Any = None, lr: float = 1e-2) -> Any:
        engine = _engine(
            tmp_path,
            make(OptimizerSpec("Adam", lr=lr)),
            [Checkpointing(best_k=0, durable=False)],
            epochs=epochs,
            accumulate_steps=2,
            grad_clip_norm=1.0,
        )
        return engine.fit(TinyRegressor(), {"data": torch.randn(16, 4)}, resume=resume)

    first = fit(1)
    resumed = fit(2, resume="last", lr=5e-3)
    assert len(resumed.history) == 2 and first.run_dir == resumed.run_dir
    log = (resumed.run_dir / "train.log").read_text()
    assert "does not declare" not in log
    assert "lr 0.01 -> 0.005" in log


class _TwoPhaseGAN(torch.nn.Module):
    """A tiny two-phase GAN on 4 features: generator and discriminator losses by phase."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.nn.Linear(4, 4)
        self.discriminator = torch.nn.Linear(4, 1)

    def forward(self, batch: Any, phase: str | None = None, **_: Any) -> dict[str, torch.Tensor]:
        x = batch if isinstance(batch, torch.Tensor) else batch["data"]
        fake = self.generator(torch.randn_like(x))
        out: dict[str, torch.Tensor] = {}
        if phase in (None, "discriminator"):
            d = self.discriminator
            out["discriminator_loss"] = (d(fake.detach()) - d(x)).mean()
        if phase in (None, "generator"):
            out["autoencoder_loss"] = -self.discriminator(fake).mean()
        return out


@pytest.mark.parametrize(
    ("disc_start", "max_steps", "refused"), [(4, None, True), (3, None, False), (2, 2, True)]
)
def test_disc_start_beyond_the_run_is_refused_before_any_file(
    tmp_path: Path, disc_start: int, max_steps: int | None, refused: bool
) -> None:
    """16 samples in batches of 8 for 2 epochs: 4 optimiser windows (2 with max_steps=2)."""
    adam = OptimizerSpec("Adam")
    strategy = Adversarial(adam, adam, two_phase=True, disc_start=disc_start)
    config = EngineConfig(
        epochs=2, batch_size=8, max_steps=max_steps, output_dir=tmp_path, run_name="gan"
    )
    engine = Engine(strategy, config)
    if refused:
        with pytest.raises(ConfigError, match=rf"disc_start={disc_start} is beyond the run"):
            engine.fit(_TwoPhaseGAN(), torch.randn(16, 4))
        assert not (tmp_path / "gan").exists()
    else:
        engine.fit(_TwoPhaseGAN(), torch.randn(16, 4))


class TrainOnlyMetric:
    """``Custom``, whose train_step alone adds a metric that is not a 0-d tensor (pre-flight,
    which sees eval_step, can not know it): refused at the first log interval, naming it."""

    def __init__(self) -> None:
        self.inner = Custom()
        self.loss_keys, self.setup, self.eval_step = (
            ("loss",),
            self.inner.setup,
            self.inner.eval_step,
        )
        self.predict_step, self.end_epoch = self.inner.predict_step, self.inner.end_epoch
        self.learning_rates, self.state_dict = self.inner.learning_rates, self.inner.state_dict
        self.load_state_dict = self.inner.load_state_dict

    def train_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> Mapping[str, Any]:
        return {**self.inner.train_step(model, batch, ctx), "per_sample": torch.ones(4)}


def test_a_train_step_metric_that_is_not_a_0d_tensor_is_named() -> None:
    config = EngineConfig(epochs=1, batch_size=4, log_every=1, output_dir=None)
    with pytest.raises(ModelOutputError, match=r"step 0: metric 'per_sample' .*shape \(4,\)"):
        Engine(TrainOnlyMetric(), config).fit(TinyRegressor(), torch.randn(8, 4))

"""One optimiser over every trainable parameter, trained on one loss (``loss`` by default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import non_empty_str, output_names
from engine.context import StepContext
from engine.errors import ModelOutputError, StrategyError
from engine.preflight import SUPPORTS_ALL
from strategies.update import (
    Update,
    UpdateSpec,
    apply_updates,
    backward_isolated,
    build_update,
    end_epoch_schedulers,
    is_plain_step,
    learning_rates,
    losses_are_finite,
    skip_step,
)


@attrs.define(eq=False)
class Standard:
    """``Standard(OptimizerSpec("Adam", lr=1e-3), scheduler=..., loss_key="loss")``.

    ``metrics`` names further scalar outputs of the model to log beside the loss (e.g. pythae's
    ``reconstruction_loss`` and ``reg_loss``).
    """

    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None = None
    loss_key: str = attrs.field(default="loss", validator=non_empty_str)
    grad_clip_norm: float | None = None
    metrics: tuple[str, ...] = attrs.field(default=(), validator=output_names)
    supports: ClassVar[frozenset[str]] = SUPPORTS_ALL  # accumulation and clipping: apply_updates
    _update: Update | None = attrs.field(default=None, init=False)
    _spec: UpdateSpec = attrs.field(init=False)
    _plain: bool = attrs.field(default=False, init=False)  # is_plain_step, for this fit

    def __attrs_post_init__(self) -> None:
        self._spec = UpdateSpec(
            "model", self.loss_key, self.optimizer, self.scheduler, self.grad_clip_norm
        )

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return (self.loss_key,)

    @property
    def updates(self) -> list[Update]:
        if self._update is None:
            raise StrategyError("Standard strategy is not set up: Engine.fit calls setup()")
        return [self._update]

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        params = [param for param in model.parameters() if param.requires_grad]
        if not params:
            raise StrategyError(f"model {type(model).__name__} has no trainable parameters")
        self._update = build_update(self._spec, params, ctx.device)
        self._plain = is_plain_step(self._update, ctx)

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        update = self._update
        assert update is not None, "Engine.fit calls setup() before train_step()"
        outputs = ctx.forward(model, batch)
        loss = ctx.read_loss(outputs, self.loss_key)
        if ctx.nonfinite == "skip" and not losses_are_finite([loss], ctx.world):
            return skip_step([update], ctx)
        if not loss.requires_grad:
            raise ModelOutputError(
                f"loss {self.loss_key!r} does not depend on any trainable parameter (it has no "
                f"grad_fn) at step {ctx.progress.step}"
            )
        metrics = {self.loss_key: loss.detach()}  # before the backward: see joint.py
        if self.metrics:
            metrics.update(self._extra_metrics(outputs, ctx))
        if self._plain and ctx.micro_count == 1:  # what the two calls below come to here
            loss.backward()
            update.optimizer.step()
            update.optimizer.zero_grad(set_to_none=True)
        else:
            backward_isolated([(update, loss)], ctx, every_group=True)
            apply_updates([update], ctx)
        return metrics

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        outputs = ctx.forward(model, batch)
        metrics = {self.loss_key: ctx.read_loss(outputs, self.loss_key).detach()}
        metrics.update(self._extra_metrics(outputs, ctx))
        return metrics

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The model's outputs for one batch (``Engine.predict`` keeps the per-sample ones)."""
        return ctx.forward(model, batch)

    def _extra_metrics(
        self, outputs: Mapping[str, Any], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """The further outputs ``metrics`` names, detached."""
        return {key: ctx.read_loss(outputs, key).detach() for key in self.metrics}

    def end_epoch(self, metrics: Mapping[str, float], ctx: StepContext) -> None:
        end_epoch_schedulers(self.updates, metrics)

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": {u.role: u.state_dict() for u in self.updates}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for update in self.updates:
            update.load_state_dict(state["updates"][update.role])

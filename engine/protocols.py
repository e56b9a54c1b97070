"""The ports other packages plug into: how one batch updates the model (``StepStrategy``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import Protocol, runtime_checkable

if TYPE_CHECKING:
    from engine.context import StepContext


@runtime_checkable
class StepStrategy(Protocol):
    """Owns every optimiser mechanic of a step: parameter groups, zero_grad/backward/step order,
    scaling, clipping, accumulation, gradient averaging across ranks, scheduler stepping, and its
    own state for checkpoints. The engine only calls these methods, in the order of
    ``engine/events.py``.
    """

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The model outputs it trains on; the first is the default monitored metric."""
        ...

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        """Build optimisers and schedulers for ``model`` (on ``ctx.device``); check its groups."""
        ...

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        """Forward, backward and optimiser steps for one batch; metrics as detached tensors."""
        ...

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        """Losses for one batch, under no grad, changing no state."""
        ...

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The model's outputs for one batch, under no grad, changing no state (the forward a
        prediction uses: a two-phase GAN's generator phase, say)."""
        ...

    def end_epoch(self, metrics: Mapping[str, float], ctx: StepContext) -> None:
        """Step per-epoch schedulers (plateau schedulers read their metric from ``metrics``)."""
        ...

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate per optimiser, keyed ``lr/<role>``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

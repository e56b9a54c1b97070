"""What the engine lends a strategy for each step: device, precision, counters, the world.

The engine owns this object and updates the accumulation window before each ``train_step``;
strategies read it and call ``forward`` and ``read_loss`` so that the model contract is checked
the same way everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch

from engine.distributed.collectives import World
from engine.errors import ModelOutputError
from engine.state import Progress

if TYPE_CHECKING:
    from engine.distributed.sharding import Sharding

ForwardFn = Callable[..., Any]


def call_model(model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
    """The default forward: ``model(batch, **kwargs)``."""
    return model(batch, **kwargs)


@attrs.define(eq=False)
class StepContext:
    """Run-wide settings and per-step counters a strategy reads.

    ``micro_index``/``micro_count`` place the current batch in its accumulation window: the
    optimisers step when ``micro_index == micro_count - 1``; losses are divided by
    ``micro_count`` so that the accumulated gradient is that of the mean loss.
    ``eval_with_grad``: evaluation and prediction run with gradients on (for models whose loss
    calls ``torch.autograd.grad``: gradient penalties, HMC steps); nothing is stepped.
    ``sharding``: the model's FSDP2 sharding under ``parallel="fsdp"`` (None otherwise): its
    backwards go through ``sharding.sharded_backward`` and its checkpoints are sharded.
    ``releases``: what the run lets go of when it ends (``release``): each role's DDP holds
    the process group, which can not be left while something holds it.
    ``compiled_step``: ``train_step`` runs under ``torch.compile`` (``compile="step"``); the
    step's helpers that dynamo must not trace as written (``strategies/update.py``) ask torch
    whether it is tracing only then, not in every eager step.
    """

    device: torch.device
    precision: str
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler | None
    grad_clip_norm: float | None
    nonfinite: str
    progress: Progress
    world: World = attrs.field(factory=World)
    forward_fn: ForwardFn = call_model
    micro_index: int = 0
    micro_count: int = 1
    eval_with_grad: bool = False
    sharding: Sharding | None = None
    compiled_step: bool = False
    releases: list[Callable[[], Any]] = attrs.field(factory=list)

    @property
    def is_update_step(self) -> bool:
        return self.micro_index == self.micro_count - 1

    def release(self) -> None:
        """Run each of ``releases`` once (at the end of ``fit``, whatever holds the context)."""
        releases, self.releases = self.releases, []
        for release in releases:
            release()

    def forward(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Mapping[str, Any]:
        """Run the model under the run's autocast; its output must be a mapping."""
        if self.autocast is not contextlib.nullcontext:
            with self.autocast():
                outputs = self.forward_fn(model, batch, **kwargs)
        elif self.forward_fn is call_model:  # fp32, the default forward: no layer between
            outputs = model(batch, **kwargs)
        else:
            outputs = self.forward_fn(model, batch, **kwargs)
        if type(outputs) is not dict and not isinstance(outputs, Mapping):
            raise ModelOutputError(
                f"the model must return a mapping of named outputs (e.g. {{'loss': ...}}), "
                f"got {type(outputs).__name__} at step {self.progress.step}"
            )
        return outputs

    def read_loss(self, outputs: Mapping[str, Any], key: str) -> torch.Tensor:
        """The scalar loss under ``key``; a missing or non-scalar loss is an error naming it."""
        loss = outputs.get(key)
        if loss is None:
            raise ModelOutputError(
                f"the model output has no loss {key!r} at step {self.progress.step}; "
                f"keys present: {sorted(outputs)}"
            )
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ModelOutputError(
                f"loss {key!r} must be a scalar tensor, got {shape} at step {self.progress.step}"
            )
        return loss

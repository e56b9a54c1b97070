"""Runs a sequential strategy's phases, each over the whole accumulation window, in order.

The engine hands a strategy one micro-batch at a time (``ctx.micro_index`` of
``ctx.micro_count``). A sequential step can not run its phases batch by batch: the generator's
phase must see the discriminator *after* its step, which comes only once the discriminator's
phase has seen every batch of the window. So ``PhaseRunner`` keeps the window's batches (they
stay where the engine put them, on the device) and, at the window's last micro-batch, runs each
due phase over all of them (StyleGAN2-ADA's rounds): forward, loss divided by the window's size,
backward into the phase's role alone, once per batch; then that role's step, before the next
phase. Accumulating ``k`` batches therefore equals one batch ``k`` times larger, per phase. The
earlier micro-batches return no metrics; the last returns each phase's means over the window.

Checkpoints are written at window ends only (``callbacks/checkpointing.py``), when no batch is
kept: the strategy's state is its optimisers and the windows completed (every phase's place in
its interval follows from that count), so a run resumed mid-cycle continues it exactly.

Flags and non-finite losses act per batch, as in the other strategies: ``update_<role>`` false
keeps that batch out of the phase's backward; under ``nonfinite="skip"`` a batch whose phase loss
is non-finite (on any rank) is dropped from that phase and every later phase of the window, and
counts once as skipped. Under a GradScaler the GradScaler is updated after each phase that
stepped: a role may step twice in a window (its main and its lazy regulariser phase), and each
phase's backward is scaled anew.

Across ranks (``engine/distributed/replication.py``) a phase's backward of its last batch
averages the role's gradients as it runs (the others accumulate locally, as DDP's ``no_sync``).
A lazy regulariser phase never does: its penalty need not reach every parameter of the role
(R1 does not reach the discriminator's last bias), which DDP's reducer, armed by the role's main
phase, would refuse; its gradients are averaged explicitly before its step instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.context import StepContext
from engine.distributed.collectives import all_ranks_agree
from engine.errors import ModelOutputError
from strategies.joint import JointUpdates, read_flag
from strategies.phases import Phase
from strategies.update import backward_isolated, losses_are_finite, step_update


@attrs.define(eq=False)
class PhaseRunner:
    """The phases of a sequential step, and the batches of the current window.

    ``metrics`` names further scalar outputs to log (from the first phase returning each).
    """

    phases: tuple[Phase, ...]
    metrics: tuple[str, ...] = ()
    _batches: list[Any] = attrs.field(factory=list, init=False)
    _checked: set[str | None] = attrs.field(factory=set, init=False)

    def runs(self, windows: int) -> dict[str, int]:
        """How many times each phase has been due over the first ``windows`` windows."""
        return {p.name: sum(p.runs_in(w) for w in range(windows)) for p in self.phases}

    def train_step(
        self, joint: JointUpdates, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Keep ``batch``; at the window's last batch run the due phases over the window."""
        self._batches.append(batch)
        if not ctx.is_update_step:
            return {}
        batches, self._batches = self._batches, []
        window = joint.windows
        step = _WindowStep(batches)
        due = [phase for phase in self.phases if phase.runs_in(window)]
        for phase in due:
            self._run(phase, step, joint, model, ctx, window)
        joint.advance()
        ctx.progress.skipped_steps += len(step.dropped)
        return step.metrics(self.metrics, every_phase_ran=len(due) == len(self.phases), ctx=ctx)

    def eval_step(
        self, joint: JointUpdates, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Each phase's loss (regularisers aside: they need gradients) from one forward per
        distinct forward, changing no state."""
        metrics: dict[str, torch.Tensor] = {}
        outputs_by_forward: dict[str | None, Mapping[str, Any]] = {}
        for phase in self.phases:
            if phase.forward not in outputs_by_forward:
                kwargs = phase.forward_kwargs(joint.windows)
                outputs_by_forward[phase.forward] = ctx.forward(model, batch, **kwargs)
            outputs = outputs_by_forward[phase.forward]
            if phase.loss_key is not None and phase.loss_key not in metrics:
                metrics[phase.loss_key] = ctx.read_loss(outputs, phase.loss_key).detach()
        sources = list(outputs_by_forward.values())
        for key in self.metrics:
            source = next((out for out in sources if key in out), sources[0])
            metrics[key] = ctx.read_loss(source, key).detach()
        return metrics

    def _run(
        self,
        phase: Phase,
        step: _WindowStep,
        joint: JointUpdates,
        model: torch.nn.Module,
        ctx: StepContext,
        window: int,
    ) -> None:
        """One phase over the window's batches, then its role's step."""
        update = joint.by_role[phase.role]
        kwargs = phase.forward_kwargs(window)
        for index, batch in enumerate(step.batches):
            if index in step.dropped:
                continue
            outputs = ctx.forward(model, batch, **kwargs)
            self._check_first(phase, outputs, ctx)
            terms = PhaseTerms.of(phase, outputs, ctx)
            if ctx.nonfinite == "skip" and not losses_are_finite(terms.checked(ctx), ctx.world):
                step.dropped.add(index)
                continue
            step.record(phase, terms, outputs, self.metrics, ctx)
            flag = read_flag(outputs, f"update_{phase.role}", ctx)
            if all_ranks_agree([flag], ctx.world)[0]:
                sync = not phase.is_lazy and index == len(step.batches) - 1
                backward_isolated([(update, terms.total(phase, ctx))], ctx, sync=sync)
        if step_update(update, ctx) and ctx.scaler is not None:
            ctx.scaler.update()

    def _check_first(self, phase: Phase, outputs: Mapping[str, Any], ctx: StepContext) -> None:
        """The first time a forward runs, every phase that uses it is checked on its outputs
        (loss keys, regulariser inputs), before any of those phases' backwards."""
        if phase.forward in self._checked:
            return
        for other in self.phases:
            if other.forward == phase.forward:
                if other.loss_key is not None:
                    ctx.read_loss(outputs, other.loss_key)
                for penalty in other.regularisers:
                    penalty.check(outputs, _where(other))
        self._checked.add(phase.forward)


@attrs.define(eq=False)
class _WindowStep:
    """What the phases of one window share: its batches, the batches dropped as non-finite,
    and each metric's values per batch."""

    batches: list[Any]
    dropped: set[int] = attrs.field(factory=set)
    values: dict[str, list[torch.Tensor]] = attrs.field(factory=dict)
    sources: dict[str, str] = attrs.field(factory=dict)

    def record(
        self,
        phase: Phase,
        terms: PhaseTerms,
        outputs: Mapping[str, Any],
        extra: tuple[str, ...],
        ctx: StepContext,
    ) -> None:
        for key, value in terms.logged(ctx).items():
            self.values.setdefault(key, []).append(value.detach())
        for key in extra:
            if key in outputs and self.sources.setdefault(key, phase.name) == phase.name:
                self.values.setdefault(key, []).append(ctx.read_loss(outputs, key).detach())

    def metrics(
        self, extra: tuple[str, ...], every_phase_ran: bool, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Each recorded value's mean over the window; an extra metric no phase returned is an
        error once every phase has run (one that did not run may be its source)."""
        if every_phase_ran and len(self.dropped) < len(self.batches):
            for key in extra:
                if key not in self.values:
                    ctx.read_loss({}, key)
        return {key: torch.stack(values).mean() for key, values in self.values.items()}


@attrs.define(eq=False)  # not frozen: torch.compile cannot trace a frozen attrs __init__
class PhaseTerms:
    """What one batch's forward gives a phase: its loss (None for a regulariser-only phase)
    and each penalty by name (unweighted by the lazy gain); never changed once built."""

    loss_key: str | None
    loss: torch.Tensor | None
    penalties: dict[str, torch.Tensor]

    @classmethod
    def of(cls, phase: Phase, outputs: Mapping[str, Any], ctx: StepContext) -> PhaseTerms:
        key = phase.loss_key
        loss = None if key is None else ctx.read_loss(outputs, key)
        penalties = {p.name: p.penalty(outputs, ctx, _where(phase)) for p in phase.regularisers}
        return cls(key, loss, penalties)

    def checked(self, ctx: StepContext) -> list[torch.Tensor]:
        """The terms ``nonfinite="skip"`` checks: all; under a GradScaler the loss only, since
        a penalty that overflowed there is the scaler's to skip and to scale down."""
        own = [] if self.loss is None else [self.loss]
        return own if ctx.scaler is not None else [*own, *self.penalties.values()]

    def logged(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The terms logged as metrics (an overflowed penalty under the scaler is left out)."""
        terms = {} if self.loss_key is None or self.loss is None else {self.loss_key: self.loss}
        for name, value in self.penalties.items():
            if ctx.scaler is None or bool(torch.isfinite(value)):
                terms[name] = value
        return terms

    def total(self, phase: Phase, ctx: StepContext) -> torch.Tensor:
        """The loss plus the penalties times the lazy gain (the phase's interval when it is a
        regulariser-only phase), checked to reach a trainable parameter."""
        gain = phase.every if phase.is_lazy else 1
        parts = [] if self.loss is None else [self.loss]
        parts.extend(value * gain if gain != 1 else value for value in self.penalties.values())
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        if not total.requires_grad:
            raise ModelOutputError(
                f"the loss of {_where(phase)} does not depend on any trainable parameter (it "
                f"has no grad_fn) at step {ctx.progress.step}"
            )
        return total


def _where(phase: Phase) -> str:
    call = "model(batch)" if phase.forward is None else f"model(batch, phase={phase.forward!r})"
    return f"phase {phase.name!r} ({call})"

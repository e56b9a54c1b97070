"""The records a sequential strategy is described by: one ``Phase`` per optimiser step.

As in StyleGAN2-ADA's training loop (Gmain, Greg, Dmain, Dreg), a step is an ordered list of
phases; each names the role it trains, the forward it runs (the ``phase=`` its model call gets),
the loss it trains on and/or its regularisers, and its interval. A phase runs its forward,
back-propagates into its own role's parameters alone and steps that role before the next phase
runs, so a generator phase after a discriminator phase sees the just-updated discriminator.

A phase with interval ``k`` runs in the optimiser windows ``w`` with ``w % k == k - 1`` (exactly
``W // k`` times over ``W`` windows; ``n_critic`` is a generator phase with ``every=n_critic``),
and not before window ``start`` (``disc_start``). A phase with regularisers and no loss key is a
*lazy* regulariser phase: its penalties are multiplied by ``k`` and its role's Adam is corrected
by ``c = 1 / (1 + sum of 1/k over the role's lazy phases)`` (StyleGAN2: ``k / (k + 1)``):
learning rate times ``c``, each beta to the power ``c``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from engine.config.validators import (
    instance_of,
    non_empty_str,
    non_negative_int,
    optional,
    positive_int,
)
from engine.errors import ConfigError
from strategies.regularisers import GradientPenalty, as_penalties, penalties


def _default_name(phase: Phase) -> str:
    return phase.role if phase.loss_key is not None else f"{phase.role}_reg"


@attrs.frozen
class Phase:
    """``Phase(role, forward, loss_key=None, regularisers=(), every=1, start=0)``.

    ``forward`` is the ``phase=`` keyword of the model call (None: ``model(batch)``).
    ``adversarial_start``, when set, makes the forward also receive ``disc_factor``: ``0.0`` in
    the windows before it and ``1.0`` from it on (taming-transformers' ``adopt_weight``), so a
    generator phase knows when its adversarial term switches on. ``name`` keys the phase's
    counter in the strategy's state (default: the role, ``<role>_reg`` for a regulariser phase).
    """

    role: str = attrs.field(validator=non_empty_str)
    forward: str | None = attrs.field(validator=optional(non_empty_str))
    loss_key: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    regularisers: tuple[GradientPenalty, ...] = attrs.field(
        default=(), converter=as_penalties, validator=penalties
    )
    every: int = attrs.field(default=1, validator=positive_int)
    start: int = attrs.field(default=0, validator=non_negative_int)
    adversarial_start: int | None = attrs.field(default=None, validator=optional(non_negative_int))
    name: str = attrs.field(
        default=attrs.Factory(_default_name, takes_self=True), validator=non_empty_str
    )

    def __attrs_post_init__(self) -> None:
        if self.loss_key is None and not self.regularisers:
            raise ConfigError(
                f"phase {self.name!r} trains on nothing: give it a loss_key, regularisers or both"
            )

    @property
    def is_lazy(self) -> bool:
        """A regulariser-only phase: its penalties carry its interval as their gain."""
        return self.loss_key is None

    def runs_in(self, window: int) -> bool:
        return window >= self.start and window % self.every == self.every - 1

    def forward_kwargs(self, window: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {} if self.forward is None else {"phase": self.forward}
        if self.adversarial_start is not None:
            kwargs["disc_factor"] = 0.0 if window < self.adversarial_start else 1.0
        return kwargs


def check_phases(phases: Iterable[Any], roles: Iterable[str]) -> tuple[Phase, ...]:
    """The phases, refused when one is not a ``Phase``, names a role the strategy does not
    have, or repeats a name, or when a role is trained by none (it would never step)."""
    checked = tuple(phases)
    known = list(roles)
    if not checked:
        raise ConfigError("phases must hold at least one Phase, got none")
    for phase in checked:
        instance_of(Phase).require("each of phases", phase)
        if phase.role not in known:
            raise ConfigError(
                f"phase {phase.name!r} names role {phase.role!r}, which is not among the "
                f"strategy's roles {known}"
            )
    names = [phase.name for phase in checked]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"phase names must differ; {repeated} name several phases")
    idle = [role for role in known if role not in {phase.role for phase in checked}]
    if idle:
        raise ConfigError(f"role(s) {idle} are trained by no phase: they would never step")
    return checked


def lazy_ratios(phases: Iterable[Phase]) -> Mapping[str, float]:
    """StyleGAN2's optimiser correction per role that has lazy regulariser phases."""
    steps: dict[str, float] = {}
    for phase in phases:
        if phase.is_lazy and phase.every > 1:
            steps[phase.role] = steps.get(phase.role, 0.0) + 1.0 / phase.every
    return {role: 1.0 / (1.0 + extra) for role, extra in steps.items()}

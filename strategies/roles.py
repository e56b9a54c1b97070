"""What a multi-loss strategy's fields say of each role, and the validators of those fields.

A strategy declares, per role, ``<role>`` (an ``OptimizerSpec``), ``<role>_scheduler`` and
``<role>_loss_key`` with the validators below, then writes them into one ``RoleFields`` record
per role, keyed by the role's name (``strategies/joint.py`` says how a strategy is composed).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import instance_of, non_empty_str, optional

ClipChoice = float | Mapping[str, float] | None

OPTIMIZER_SPEC = instance_of(OptimizerSpec)
SCHEDULER_SPEC = optional(instance_of(SchedulerSpec))
LOSS_KEY = non_empty_str


@attrs.frozen
class RoleFields:
    """One role's optimiser, scheduler and loss key, as the strategy's fields hold them."""

    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None
    loss_key: str

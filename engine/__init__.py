"""strategy-engine's core: the loop, its config, events, data, precision and the ports.

The public names below are imported on first use (PEP 562 ``__getattr__``), so that
``import engine`` (and ``strategy-engine --help``) does not import torch. ``from engine import
Engine`` works as usual; the table says where each name lives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config.engine_config import EngineConfig
    from engine.config.specs import OptimizerSpec, SchedulerSpec
    from engine.context import StepContext
    from engine.distributed.collectives import World
    from engine.distributed.session import leave_process_group
    from engine.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DistributedError,
        ModelOutputError,
        NonFiniteLossError,
        StrategyError,
    )
    from engine.events import (
        CHECKPOINT_PRIORITY,
        EARLY_STOPPING_PRIORITY,
        Event,
        EventBus,
        Subscription,
    )
    from engine.loop import Engine
    from engine.protocols import StepStrategy
    from engine.state import FitResult, Progress, RunState

# Public name -> the module that defines it.
_WHERE = {
    "EngineConfig": "engine.config.engine_config",
    "OptimizerSpec": "engine.config.specs",
    "SchedulerSpec": "engine.config.specs",
    "StepContext": "engine.context",
    "World": "engine.distributed.collectives",
    "leave_process_group": "engine.distributed.session",
    "CheckpointError": "engine.errors",
    "ConfigError": "engine.errors",
    "DataError": "engine.errors",
    "DistributedError": "engine.errors",
    "ModelOutputError": "engine.errors",
    "NonFiniteLossError": "engine.errors",
    "StrategyError": "engine.errors",
    "CHECKPOINT_PRIORITY": "engine.events",
    "EARLY_STOPPING_PRIORITY": "engine.events",
    "Event": "engine.events",
    "EventBus": "engine.events",
    "Subscription": "engine.events",
    "Engine": "engine.loop",
    "StepStrategy": "engine.protocols",
    "FitResult": "engine.state",
    "Progress": "engine.state",
    "RunState": "engine.state",
}

__all__ = [
    "CHECKPOINT_PRIORITY",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "EARLY_STOPPING_PRIORITY",
    "Engine",
    "EngineConfig",
    "Event",
    "EventBus",
    "FitResult",
    "ModelOutputError",
    "NonFiniteLossError",
    "OptimizerSpec",
    "Progress",
    "RunState",
    "SchedulerSpec",
    "StepContext",
    "StepStrategy",
    "StrategyError",
    "Subscription",
    "World",
    "leave_process_group",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

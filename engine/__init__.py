"""strategy-engine's core: the loop, its config, events, data, precision and the ports."""

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

__all__ = [
    "CHECKPOINT_PRIORITY",
    "EARLY_STOPPING_PRIORITY",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
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

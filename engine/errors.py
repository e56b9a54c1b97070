"""The errors the engine raises. Each names the problem and the offending value.

They subclass the built-in exception that best describes them, so callers can catch either ours
or the standard one (a bad config value is also a ``ValueError``).
"""


class ConfigError(ValueError):
    """A configuration value is invalid: raised at construction, before any training."""


class DataError(ValueError):
    """The training or evaluation data can not be batched as asked."""


class ModelOutputError(RuntimeError):
    """The model's output breaks the contract: not a mapping, a missing or non-scalar loss."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite (policy ``nonfinite="raise"``)."""


class StrategyError(RuntimeError):
    """A strategy can not be set up for this model (e.g. parameter groups overlap)."""


class CheckpointError(RuntimeError):
    """A checkpoint can not be written or read: corrupt, truncated, foreign or unsafe."""


class DistributedError(RuntimeError):
    """The processes of a run can not work together: a rank failed or timed out during a
    collective, or the launch environment is incomplete (a world size without a rendezvous)."""


# Every error above: what a user's mistake raises (the CLI prints each as one ``error:`` line;
# pre-flight lets each through unchanged).
OUR_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    ModelOutputError,
    NonFiniteLossError,
    StrategyError,
    CheckpointError,
    DistributedError,
)

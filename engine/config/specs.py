"""Optimiser and scheduler choices: a torch name, a class or a factory, with its parameters.

Specs are frozen values, checked at construction (unknown names and unknown keyword arguments
are errors there), and built later against a parameter group by ``build_optimizer`` and
``build_scheduler``. Where torch has a fused kernel for the optimiser on the run's device, it is
used unless the user chose ``fused`` or ``foreach`` themselves (or the kernel is known to be
wrong for the settings: SGD with momentum).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import attrs
import torch

from engine.config.validators import one_of
from engine.errors import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerInterval = Literal["epoch", "step"]

# Optimisers whose fused kernel torch provides on these device types.
_FUSED_DEVICES: dict[str, frozenset[str]] = {
    "Adam": frozenset({"cpu", "cuda", "mps"}),
    "AdamW": frozenset({"cpu", "cuda", "mps"}),
    "SGD": frozenset({"cpu", "cuda", "mps"}),
    "Adagrad": frozenset({"cpu"}),
}


def _fused_momentum_unsafe(cls: type, params: Mapping[str, Any]) -> bool:
    """Whether torch's fused kernel would mishandle these settings: fused SGD allocates its
    momentum buffers uninitialised on its first step and fills them inside the kernel, which
    skips when an fp16 GradScaler found an inf; the buffers then hold garbage and the next step
    throws the parameters far away (seen on CPU and CUDA, torch 2.11 and 2.13)."""
    return cls.__name__ == "SGD" and float(params.get("momentum", 0.0)) != 0.0


def _torch_names(module: Any, base: type) -> dict[str, type]:
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, base)
        and value is not base
        and not name.startswith("_")
    }


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """The optimiser classes that ``torch.optim`` offers, by name."""
    return _torch_names(torch.optim, torch.optim.Optimizer)


def scheduler_classes() -> dict[str, type]:
    """The scheduler classes that ``torch.optim.lr_scheduler`` offers, by name."""
    names = _torch_names(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    names["ReduceLROnPlateau"] = torch.optim.lr_scheduler.ReduceLROnPlateau
    return names


def _check_keywords(kind: str, target: Any, params: Mapping[str, Any], skip: int) -> None:
    """Refuse keyword arguments the class does not take (a typo would be silently ignored)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    accepted = list(signature.parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted):
        return
    names = {p.name for p in accepted}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(
            f"{kind} {getattr(target, '__name__', target)!r} takes no argument(s) {unknown}; "
            f"it takes {sorted(names)}"
        )


def _resolve(kind: str, target: Any, known: dict[str, type]) -> Any:
    if isinstance(target, str):
        if target not in known:
            raise ConfigError(f"unknown {kind} name {target!r}; known: {sorted(known)}")
        return known[target]
    if callable(target):
        return target
    raise ConfigError(f"{kind} must be a name, a class or a factory, got {target!r}")


@attrs.frozen(init=False)
class OptimizerSpec:
    """An optimiser: ``OptimizerSpec("Adam", lr=1e-3)``, a class, or ``factory(params)``."""

    target: str | Callable[..., Any]
    params: Mapping[str, Any]

    def __init__(self, target: str | Callable[..., Any], /, **params: Any) -> None:
        resolved = _resolve("optimizer", target, optimizer_classes())
        if isinstance(resolved, type):
            _check_keywords("optimizer", resolved, params, skip=1)
        self.__attrs_init__(target, dict(params))

    @property
    def name(self) -> str:
        return self.target if isinstance(self.target, str) else self.target.__name__

    def build(self, parameters: Iterable[torch.nn.Parameter], device: torch.device) -> Any:
        """The optimiser over ``parameters``, fused on ``device`` where torch supports it."""
        cls = _resolve("optimizer", self.target, optimizer_classes())
        params = dict(self.params)
        fused_devices = _FUSED_DEVICES.get(getattr(cls, "__name__", ""), frozenset())
        if (
            isinstance(cls, type)
            and device.type in fused_devices
            and "fused" not in params
            and "foreach" not in params
            and "fused" in inspect.signature(cls).parameters
            and not _fused_momentum_unsafe(cls, params)
        ):
            params["fused"] = True
        return cls(list(parameters), **params)


@attrs.frozen(init=False)
class SchedulerSpec:
    """A learning-rate scheduler, stepped per ``"epoch"`` or per ``"step"`` (optimiser step).

    ``ReduceLROnPlateau`` needs ``monitor``: the metric it watches (e.g. ``"eval/loss"``); it is
    stepped per epoch with that metric's value.
    """

    target: str | Callable[..., Any]
    interval: SchedulerInterval = attrs.field(validator=one_of("epoch", "step"))
    monitor: str | None
    params: Mapping[str, Any]

    def __init__(
        self,
        target: str | Callable[..., Any],
        /,
        *,
        interval: SchedulerInterval = "epoch",
        monitor: str | None = None,
        **params: Any,
    ) -> None:
        resolved = _resolve("scheduler", target, scheduler_classes())
        self.__attrs_init__(target, interval, monitor, dict(params))
        is_plateau = resolved is torch.optim.lr_scheduler.ReduceLROnPlateau
        if is_plateau and not monitor:
            raise ConfigError(
                "ReduceLROnPlateau needs a metric to monitor: pass monitor='eval/loss' (or any "
                f"metric the run logs), got monitor={monitor!r}"
            )
        if is_plateau and interval != "epoch":
            raise ConfigError(f"ReduceLROnPlateau steps per epoch, got interval={interval!r}")
        if isinstance(resolved, type):
            _check_keywords("scheduler", resolved, params, skip=1)

    @property
    def name(self) -> str:
        return self.target if isinstance(self.target, str) else self.target.__name__

    @property
    def is_plateau(self) -> bool:
        resolved = _resolve("scheduler", self.target, scheduler_classes())
        return resolved is torch.optim.lr_scheduler.ReduceLROnPlateau

    def build(self, optimizer: torch.optim.Optimizer) -> Any:
        cls = _resolve("scheduler", self.target, scheduler_classes())
        return cls(optimizer, **self.params)

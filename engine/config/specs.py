"""Optimiser and scheduler choices: a torch name, a class or a factory, with its parameters.

Specs are frozen values, checked at construction: unknown names, unknown keyword arguments and
missing required ones are errors there, and a torch class is built once on a stand-in parameter
(a scheduler on a stand-in optimiser, stepped once), so that a value torch refuses (``lr=-1``,
``lr="1e-2"``, ``betas=0.9``, ``step_size="a"``) is a ``ConfigError`` naming the argument and the
value before any model exists. ``check_scheduler`` repeats the scheduler's check on the role's
own optimiser class (the pre-flight stage calls it), and ``build`` turns whatever torch still
refuses on the real parameters into the same error. Where torch has a fused kernel for the
optimiser on the run's device, it is used unless the user chose ``fused`` or ``foreach``
themselves (or the kernel is known to be wrong for the settings: SGD with momentum).

``role_specs(strategy)`` reads a strategy's optimiser and scheduler specs by role, by the
constructor convention the command line also uses: ``optimizer``/``scheduler`` for the single
role ``model`` (``Standard``), ``<role>``/``<role>_scheduler`` for each role of a multi-role one.
"""

from __future__ import annotations

import functools
import inspect
import warnings
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


# The three look-ups below read torch's classes, which do not change while a process runs: each
# is computed once (every fit builds its optimisers; the scan and the signature took about
# 0.1 ms a fit). Callers must not change the mappings they return.


@functools.cache
def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """The optimiser classes that ``torch.optim`` offers, by name."""
    return _torch_names(torch.optim, torch.optim.Optimizer)


@functools.cache
def scheduler_classes() -> dict[str, type]:
    """The scheduler classes that ``torch.optim.lr_scheduler`` offers, by name."""
    names = _torch_names(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    names["ReduceLROnPlateau"] = torch.optim.lr_scheduler.ReduceLROnPlateau
    return names


@functools.cache
def _takes_fused(cls: type) -> bool:
    """Whether the optimiser class ``cls`` has a ``fused`` argument."""
    return "fused" in inspect.signature(cls).parameters


def _check_keywords(kind: str, target: Any, params: Mapping[str, Any], skip: int) -> None:
    """Refuse keyword arguments the class does not take (a typo would be silently ignored),
    then required ones that are missing (torch would fail later with a bare TypeError)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    accepted = list(signature.parameters.values())[skip:]
    name = getattr(target, "__name__", target)
    names = {p.name for p in accepted}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted):
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(
                f"{kind} {name!r} takes no argument(s) {unknown}; it takes {sorted(names)}"
            )
    for parameter in accepted:
        if parameter.name in params:
            _check_type(kind, name, parameter, params[parameter.name])
    required = [
        p.name
        for p in accepted
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in params
    ]
    if required:
        raise ConfigError(
            f"{kind} {name!r} needs argument(s) {required}; got {_call_text(name, params)}"
        )


# A required argument (no default) has its kind read from a plain annotation: a value standing
# for that kind, as a default would.
_ANNOTATED: dict[str, Any] = {"int": 1, "float": 1.0, "bool": False, "str": ""}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits_default(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of ``default``: a bool for a bool; a number (a tensor, or
    one per parameter group) for a number; a sequence as long, of numbers, for a tuple; a
    string for a string. Anything goes where the default is None or of another kind."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if _is_number(default):
        if isinstance(value, (list, tuple)):
            return bool(value) and all(_is_number(item) for item in value)
        return _is_number(value) or isinstance(value, torch.Tensor)
    if isinstance(default, tuple):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(default)
            and all(_is_number(v) or (v is None and d is None) for v, d in zip(value, default))
        )
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _check_type(kind: str, name: Any, parameter: inspect.Parameter, value: Any) -> None:
    """Refuse an argument of another kind than its default, or than its plain annotation
    where it has no default (``lr="1e-2"``, ``betas=0.9``, ``amsgrad="yes"``,
    ``step_size="a"``), which torch would take, or refuse only with a bare TypeError."""
    default, key = parameter.default, parameter.name
    if default is inspect.Parameter.empty:
        default = _ANNOTATED.get(str(parameter.annotation), default)
        like = f"(its type is {parameter.annotation})"
    else:
        like = f"like its default {default!r}"
    if default is inspect.Parameter.empty or _fits_default(value, default):
        return
    hint = ""
    if isinstance(value, str) and _is_number_text(value):
        hint = f" (a string: write the number without quotes, {key} = {value})"
    if isinstance(default, bool):
        what = "true or false"
    elif isinstance(default, tuple):
        what = f"{len(default)} numbers"
    else:
        what = "a number" if _is_number(default) else "a string"
    raise ConfigError(f"{kind} {name}: argument {key}={value!r} must be {what} {like}{hint}")


def _call_text(name: Any, params: Mapping[str, Any]) -> str:
    """``Adam(lr=-1, betas=0.9)``: how the user wrote the spec, for messages."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return f"{name}({arguments})"


# Arguments whose validity depends on the device: the stand-in parameter lives on the CPU.
_DEVICE_KEYS = ("fused", "foreach", "capturable")


def _stand_in() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def _refused(
    kind: str,
    name: str,
    params: Mapping[str, Any],
    error: BaseException,
    attempt: Callable[[dict[str, Any]], Any],
    role: str | None,
) -> ConfigError:
    """A ``ConfigError`` for torch's refusal of ``name(**params)``: the role, the argument to
    blame (the one whose removal lets ``attempt`` succeed) and its value, and torch's words."""
    where = f"role {role!r}: " if role else ""
    reason = f"{type(error).__name__}: {error}"
    culprit = _culprit(params, attempt)
    if culprit is None:
        return ConfigError(
            f"{where}{kind} {_call_text(name, params)} is refused by torch: {reason}"
        )
    value = params[culprit]
    hint = ""
    if isinstance(value, str) and _is_number_text(value):
        hint = f" (a string: write the number without quotes, {culprit} = {value})"
    return ConfigError(
        f"{where}{kind} {name}: argument {culprit}={value!r} is refused by torch{hint}: {reason}"
    )


def _culprit(params: Mapping[str, Any], attempt: Callable[[dict[str, Any]], Any]) -> str | None:
    """The argument to blame: the one whose removal lets ``attempt`` succeed or, for a required
    argument, only makes torch say it is missing; None where that is not exactly one."""
    candidates = []
    for key in params:
        try:
            attempt({k: v for k, v in params.items() if k != key})
        except TypeError as error:  # without a required argument: is that all it says?
            if "missing" in str(error) and repr(key) in str(error):
                candidates.append(key)
            continue
        except Exception:  # still refused without it: not this one
            continue
        return key
    return candidates[0] if len(candidates) == 1 else None


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _try_optimizer(cls: Any, params: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cls`` built on a stand-in parameter with ``params`` (device-bound ones left out)."""
    probe = {k: v for k, v in params.items() if k not in _DEVICE_KEYS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(_stand_in(), **probe)  # type: ignore[no-any-return]


def _try_scheduler(cls: Any, params: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """``cls(optimizer, **params)`` built and stepped once (some values fail only there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = cls(optimizer, **params)
        optimizer.step()
        if cls is torch.optim.lr_scheduler.ReduceLROnPlateau:
            scheduler.step(0.0)
        else:
            scheduler.step()


def _call_with(cls: Any, first: Any, params: Mapping[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(first, **params)


def _stand_in_optimizer() -> torch.optim.Optimizer:
    """An optimiser with a learning rate and a momentum, as schedulers expect."""
    return torch.optim.SGD(_stand_in(), lr=0.1, momentum=0.9)


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
    """An optimiser: ``OptimizerSpec("Adam", lr=1e-3)``, a class, or ``factory(params)``.

    A torch class is built once on a stand-in parameter at construction, so that a value it
    refuses is a ``ConfigError`` here (a factory is called only by ``build``)."""

    target: str | Callable[..., Any]
    params: Mapping[str, Any]

    def __init__(self, target: str | Callable[..., Any], /, **params: Any) -> None:
        resolved = _resolve("optimizer", target, optimizer_classes())
        if isinstance(resolved, type):
            _check_keywords("optimizer", resolved, params, skip=1)
            self._probe(resolved, params)
        self.__attrs_init__(target, dict(params))

    @staticmethod
    def _probe(cls: type, params: Mapping[str, Any], role: str | None = None) -> None:
        try:
            _try_optimizer(cls, params)
        except (ValueError, TypeError) as error:
            attempt = functools.partial(_try_optimizer, cls)
            raise _refused("optimizer", cls.__name__, params, error, attempt, role) from None

    @property
    def name(self) -> str:
        return self.target if isinstance(self.target, str) else self.target.__name__

    def stand_in(self) -> torch.optim.Optimizer:
        """This optimiser over a stand-in parameter (for checking a scheduler against it)."""
        cls = _resolve("optimizer", self.target, optimizer_classes())
        if isinstance(cls, type):
            return _try_optimizer(cls, self.params)
        return _stand_in_optimizer()

    def build(
        self,
        parameters: Iterable[torch.nn.Parameter],
        device: torch.device,
        role: str | None = None,
    ) -> Any:
        """The optimiser over ``parameters``, fused on ``device`` where torch supports it; what
        torch refuses is a ``ConfigError`` naming ``role``, the argument and the value."""
        cls = _resolve("optimizer", self.target, optimizer_classes())
        params = dict(self.params)
        fused_devices = _FUSED_DEVICES.get(getattr(cls, "__name__", ""), frozenset())
        if (
            isinstance(cls, type)
            and device.type in fused_devices
            and "fused" not in params
            and "foreach" not in params
            and _takes_fused(cls)
            and not _fused_momentum_unsafe(cls, params)
        ):
            params["fused"] = True
        group = list(parameters)
        try:
            return cls(group, **params)
        except (ValueError, TypeError) as error:
            attempt = functools.partial(_call_with, cls, group)
            raise _refused("optimizer", self.name, self.params, error, attempt, role) from None


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
            _check_scheduler(resolved, self.params, _stand_in_optimizer, None)

    @property
    def name(self) -> str:
        return self.target if isinstance(self.target, str) else self.target.__name__

    @property
    def is_plateau(self) -> bool:
        resolved = _resolve("scheduler", self.target, scheduler_classes())
        return resolved is torch.optim.lr_scheduler.ReduceLROnPlateau

    def build(self, optimizer: torch.optim.Optimizer, role: str | None = None) -> Any:
        """The scheduler of ``optimizer``; what torch refuses is a ``ConfigError`` naming
        ``role``, the argument and the value."""
        cls = _resolve("scheduler", self.target, scheduler_classes())
        try:
            return cls(optimizer, **self.params)
        except (ValueError, TypeError) as error:
            attempt = functools.partial(_call_with, cls, optimizer)
            raise _refused("scheduler", self.name, self.params, error, attempt, role) from None


def _check_scheduler(
    cls: Any,
    params: Mapping[str, Any],
    optimizer: Callable[[], torch.optim.Optimizer],
    role: str | None,
) -> None:
    """Build ``cls`` on a fresh ``optimizer()`` and step it once; a failure is a ConfigError."""
    try:
        _try_scheduler(cls, params, optimizer())
    except Exception as error:  # whatever torch raises on these values is the user's to fix

        def attempt(rest: dict[str, Any]) -> None:
            _try_scheduler(cls, rest, optimizer())

        raise _refused("scheduler", cls.__name__, params, error, attempt, role) from None


def check_scheduler(role: str, optimizer: OptimizerSpec, scheduler: SchedulerSpec) -> None:
    """``scheduler`` built on a stand-in of ``role``'s own optimiser class and stepped once (a
    scheduler may need what only some optimisers have, e.g. a momentum)."""
    cls = _resolve("scheduler", scheduler.target, scheduler_classes())
    if isinstance(cls, type):
        _check_scheduler(cls, scheduler.params, optimizer.stand_in, role)


def role_specs(strategy: Any) -> dict[str, tuple[OptimizerSpec, SchedulerSpec | None]]:
    """A strategy's optimiser (and scheduler) spec per role, read from its attributes by the
    constructor convention: ``optimizer``/``scheduler`` are role ``model``'s; any other attribute
    holding an ``OptimizerSpec`` names a role, whose scheduler is ``<role>_scheduler``. A
    strategy that keeps its specs otherwise yields none (its optimisers are still checked when
    ``setup`` builds them)."""
    values = attrs.asdict(strategy, recurse=False) if attrs.has(type(strategy)) else {}
    found: dict[str, tuple[OptimizerSpec, SchedulerSpec | None]] = {}
    for field, value in values.items():
        if not isinstance(value, OptimizerSpec):
            continue
        role, scheduler_field = (
            ("model", "scheduler") if field == "optimizer" else (field, f"{field}_scheduler")
        )
        scheduler = values.get(scheduler_field)
        found[role] = (value, scheduler if isinstance(scheduler, SchedulerSpec) else None)
    return found

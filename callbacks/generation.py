"""How the image callbacks run a model: its sampler, its noise, its EMA weights, quietly.

``SampleGrid`` and ``QualityMetrics`` both call a generator on noise (``resolve_method``,
``noise_shape_of``), with the run's ``EMA`` weights when asked (``find_emas``, ``ema_weights``),
in eval mode without gradients inside a forked RNG (``quiet_eval``), so that drawing or
measuring changes nothing the training sees.

Under FSDP2 (``parallel="fsdp"``) a forward of the sharded model is collective: each FSDP unit
all-gathers its parameters from every rank. So the pictures rank 0 saves are drawn on every rank
in lockstep (``runs_the_model``), and a method run outside ``forward`` (``sample``) must be one
the engine registered with FSDP (``EngineConfig.fsdp_forward_methods``) or an FSDP unit itself;
``check_sharded_method`` refuses any other at FIT_START, naming it, instead of a failure (or a
hang) at the first picture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch

from callbacks.ema import EMA
from engine.distributed.sharding import is_sharded_model
from engine.distributed.units import reshard_model
from engine.errors import ConfigError
from engine.state import RunState


def check_noise_shape(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, (tuple, list)) and bool(value)
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(
            f"noise_shape must be a list of positive integers (one sample's noise, e.g. [64]) "
            f"or None, got {value!r}"
        )


def check_value_range(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    numbers = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not numbers or not value[0] < value[1]:
        raise ConfigError(f"value_range must be two numbers low < high, got {value!r}")


def check_ema_choice(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"ema must be true, false or None (when present), got {value!r}")


def find_emas(run: RunState, choice: bool | None, who: str) -> list[EMA]:
    """The run's ``EMA`` callbacks when ``choice`` is True or None; True requires one."""
    if choice is False:
        return []
    found = [callback for callback in run.engine.callbacks if isinstance(callback, EMA)]
    if choice and not found:
        raise ConfigError(f"{who}(ema=True) needs an EMA callback in the run; there is none")
    return found


@contextlib.contextmanager
def ema_weights(emas: Sequence[EMA]) -> Iterator[None]:
    """Every EMA's weights in the model for the duration of the block."""
    with contextlib.ExitStack() as stack:
        for ema in emas:
            stack.enter_context(ema.applied())
        yield


@contextlib.contextmanager
def quiet_eval(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in eval mode, under ``no_grad``, inside a forked RNG; its mode comes back, and
    an FSDP model its shards (the forwards may have left units gathered)."""
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        model.train(was_training)
        reshard_model(model)


def resolve_method(model: torch.nn.Module, path: str) -> Callable[..., Any]:
    """The callable at dotted ``path`` on ``model`` (``"sample"``, ``"generator"``...)."""
    target: Any = model
    for part in path.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"method {path!r}: {type(target).__name__} has no attribute {part!r}; give "
                "the model a sample(noise) method or name its generator, e.g. method='generator'"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"method {path!r} is a {type(target).__name__}, not callable")
    return target


def noise_shape_of(model: torch.nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    """``given``, else ``model.latent_shape``, else ``(model.latent_dim,)``."""
    if given is not None:
        return tuple(given)
    shape = getattr(model, "latent_shape", None)
    if shape is not None:
        return tuple(int(v) for v in shape)
    dim = getattr(model, "latent_dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
        return (dim,)
    raise ConfigError(
        f"{type(model).__name__} has no latent_shape or latent_dim: give noise_shape, the shape "
        "of one sample's noise (e.g. [64])"
    )


def runs_the_model(run: RunState) -> bool:
    """Whether this rank runs the model for the pictures rank 0 saves: rank 0 when it has a
    run folder (``output_dir`` set); under FSDP every rank then too, since each forward of a
    sharded model all-gathers from every rank (rank 0 alone would wait for the others)."""
    if run.is_main_process:
        return run.run_dir is not None
    return run.config.output_dir is not None and is_sharded_model(run.model)


def check_sharded_method(run: RunState, path: str, who: str) -> None:
    """Under FSDP, method ``path`` of the model, run outside ``forward``, gathers its
    parameters only when registered (named in ``fsdp_forward_methods``) or when it is an FSDP
    unit (a module ``fully_shard`` wrapped); anything else is a ``ConfigError`` naming it and
    the fix. Nothing to check for a model that is not sharded."""
    model = run.model
    if not is_sharded_model(model):
        return
    registered = tuple(run.config.fsdp_forward_methods)
    if path in registered:
        return
    target = resolve_method(model, path)
    from torch.distributed.fsdp import FSDPModule  # imported already: the model is sharded

    if isinstance(target, FSDPModule):
        return
    if isinstance(target, torch.nn.Module):
        fix = (
            f"model.{path} is not an FSDP unit of its own (its parameters are gathered by the "
            f"forward of the module that holds them): name its class in fsdp_blocks (e.g. "
            f"fsdp_blocks=[{type(target).__name__!r}])"
        )
    else:
        fix = f"name it in fsdp_forward_methods (e.g. fsdp_forward_methods=[{path!r}])"
    raise ConfigError(
        f"{who}: method {path!r} runs outside the forward of a model sharded by FSDP "
        f"(parallel='fsdp'), so it would not gather its parameters; {fix}. Registered now: "
        f"fsdp_forward_methods={list(registered)}"
    )

"""An exponential moving average (EMA) of a module's weights, kept on the device beside it.

``EMA(module="generator", half_life=10_000)`` keeps ``ema = beta * ema + (1 - beta) * weights``
for every parameter of ``model.generator`` (``module=None``: the whole model), updated after each
optimiser step: at BATCH_END of the last batch of an accumulation window
(``ctx.micro_index == ctx.micro_count - 1``), with one ``torch._foreach_lerp_`` over all the
parameters. Buffers (BatchNorm statistics) are copied, not averaged, as StyleGAN does.

``beta`` comes from a half-life counted in samples, StyleGAN2-ADA's ``ema_kimg`` (times 1000):
``beta = 0.5 ** (window_samples / half_life)``, where ``window_samples`` is the nominal global
batch of one optimiser step (``batch_size * world_size * accumulate window``): after
``half_life`` samples the old weights' share has halved, whatever the batch size. With
``rampup`` (StyleGAN's ``ema_rampup``, e.g. 0.05) the half-life is ``min(half_life,
samples_seen * rampup)``, so early EMA weights are not dragged back toward the random start.
Or a fixed ``decay`` (``beta = decay``) per optimiser step.

The average is a choice for evaluation, not hidden: ``use_for_eval=True`` swaps the EMA weights
into the model at EVAL_START and the raw ones back at EVAL_END (logged once), so ``eval/...``
losses are the EMA model's; ``with ema.applied(): ...`` does the same for any code (the
``SampleGrid`` and ``QualityMetrics`` callbacks use it). The raw weights come back bitwise. At
FIT_END, ``export=True`` writes ``model_ema.pt`` beside ``model_final.pt``: the whole model's
``state_dict`` with the EMA values in place of the tracked module's, loadable the same way.

Checkpoints hold the EMA tensors and the sample counter (``state_dict``), so a resumed run goes
on bitwise as the uninterrupted one. Under several processes every rank keeps its own EMA, with
no communication: the engine averages gradients, so the ranks' parameters are identical after
each step and so are their EMAs (buffers such as BatchNorm statistics may differ per rank, as
the raw model's do; evaluation broadcasts rank 0's). The EMA costs one copy of the module's
weights in device memory (two while it is swapped in).

Under FSDP2 (``parallel="fsdp"``) a parameter is a ``DTensor`` whose rank holds one shard, and
so is its average: each rank keeps the EMA of its own shards (plain local tensors, 1/N of the
weights), updated and swapped in with local ops only (no communication), so the memory saving
stays. Swapping reshards the model's FSDP units first and after (a unit left gathered by a
forward with ``fsdp_reshard_after_forward=False`` would otherwise compute with the weights it
gathered, not the ones swapped in, and hand them to the next training step). ``averaged``
gives the shards as DTensors (``.full_tensor()`` on every rank gathers one). Collective
there, so every rank calls them at the same point (the engine's events do): ``state_dict``
gathers the full tensors to the CPU (a checkpoint's ``training.pt`` holds plain tensors, which
load into any world size, one process too) and the ``model_ema.pt`` export gathers the model
to rank 0; ``load_state_dict`` takes each rank's shard of the full tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from engine.checkpoint.export import export_weights
from engine.config.validators import is_bool, optional, positive_number
from engine.distributed.sharding import is_dtensor, is_sharded_model
from engine.distributed.units import fsdp_units, reshard
from engine.errors import CheckpointError, ConfigError
from engine.state import RunState

# Runs before every default-priority callback: the EMA is up to date when they read it at
# BATCH_END, and its weights are swapped back before Checkpointing saves on an exception.
EMA_PRIORITY = 90
DEFAULT_HALF_LIFE = 10_000.0
EXPORT_FILENAME = "model_ema.pt"


def _decay(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0.0 < value < 1.0:
        raise ConfigError(f"decay must be a number in (0, 1) or None, got {value!r}")


def _module_path(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value or value.strip(".") != value):
        raise ConfigError(
            f"module must be a dotted attribute path such as 'generator' or None (the whole "
            f"model), got {value!r}"
        )


def resolve_module(model: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """``model`` itself for ``None``, else the submodule at dotted ``path``; a ConfigError names
    the path and the children found where it broke off."""
    module = model
    if path is None:
        return module
    walked: list[str] = []
    for part in path.split("."):
        child = getattr(module, part, None) if part else None
        if not isinstance(child, torch.nn.Module):
            where = ".".join(walked) or type(model).__name__
            children = sorted(name for name, _ in module.named_children())
            raise ConfigError(
                f"module {path!r}: {where} has no submodule {part!r}; its submodules are {children}"
            )
        module, walked = child, [*walked, part]
    return module


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a ``DTensor``'s local shard (under ``no_grad`` a view
    into FSDP's sharded storage, so writes reach the parameter), else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _sharded_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` as a shard of a tensor laid out as ``param`` (a ``DTensor`` viewing it, no
    communication); ``local`` itself where ``param`` is a plain tensor."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    assert isinstance(param, DTensor)
    return DTensor.from_local(
        local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def _full(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``local`` is this rank's shard, laid out as ``param`` (an
    all-gather under FSDP: every rank calls it), on the CPU; ``local`` itself otherwise."""
    if not is_dtensor(param):
        return local
    return _sharded_like(local, param).full_tensor().cpu()  # type: ignore[attr-defined]


def _shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` as ``param`` is laid out (each rank cuts its own from the
    full tensor it holds: no communication); ``full`` itself where ``param`` is plain."""
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    spread = distribute_tensor(
        full.to(param.device),
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return spread.to_local()


def beta_for(
    samples_seen: int,
    window_samples: int,
    half_life: float | None,
    decay: float | None,
    rampup: float | None,
) -> float:
    """The weight kept by the old average at one update (StyleGAN2-ADA's ``ema_beta``)."""
    if decay is not None:
        return float(decay)
    assert half_life is not None
    life = half_life if rampup is None else min(half_life, samples_seen * rampup)
    return float(0.5 ** (window_samples / max(life, 1e-8)))


@attrs.define(eq=False)
class EMA:
    """``EMA(module=None, half_life=None, decay=None, rampup=None, use_for_eval=False,
    export=True)``: see the module docstring. Give ``half_life`` (samples) or ``decay``, not
    both; neither means a half-life of ``DEFAULT_HALF_LIFE`` samples. ``rampup`` needs a
    half-life."""

    module: str | None = attrs.field(default=None, validator=_module_path)
    half_life: float | None = attrs.field(default=None, validator=optional(positive_number))
    decay: float | None = attrs.field(default=None, validator=_decay)
    rampup: float | None = attrs.field(default=None, validator=optional(positive_number))
    use_for_eval: bool = attrs.field(default=False, validator=is_bool)
    export: bool = attrs.field(default=True, validator=is_bool)
    priority: int = EMA_PRIORITY
    samples_seen: int = attrs.field(default=0, init=False)
    updates: int = attrs.field(default=0, init=False)
    _target: torch.nn.Module | None = attrs.field(default=None, init=False)
    _units: list[torch.nn.Module] = attrs.field(factory=list, init=False)
    _params: list[torch.Tensor] = attrs.field(factory=list, init=False)
    _buffers: list[torch.Tensor] = attrs.field(factory=list, init=False)
    _param_names: list[str] = attrs.field(factory=list, init=False)
    _buffer_names: list[str] = attrs.field(factory=list, init=False)
    _ema_params: list[torch.Tensor] = attrs.field(factory=list, init=False)
    _ema_buffers: list[torch.Tensor] = attrs.field(factory=list, init=False)
    _pending: Mapping[str, Any] | None = attrs.field(default=None, init=False)
    _swapped: list[torch.Tensor] | None = attrs.field(default=None, init=False)
    _logged_eval: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if self.half_life is not None and self.decay is not None:
            raise ConfigError(
                f"give half_life or decay, not both (half_life={self.half_life!r}, "
                f"decay={self.decay!r})"
            )
        if self.rampup is not None and self.decay is not None:
            raise ConfigError(
                f"rampup={self.rampup!r} shortens a half-life; it does not apply to a fixed "
                f"decay={self.decay!r}: give half_life instead"
            )
        if self.half_life is None and self.decay is None:
            self.half_life = DEFAULT_HALF_LIFE

    # ---------------------------------------------------------------- set-up

    def attach(self, model: torch.nn.Module) -> None:
        """Start averaging ``model``'s module from its current weights (FIT_START does this);
        a state loaded before (a checkpoint's) is put in place instead."""
        target = resolve_module(model, self.module)
        self._target = target
        self._units = fsdp_units(model)
        reshard(self._units)  # a gathered unit lists its gathered copies, not the shards
        named_params = list(target.named_parameters())
        named_buffers = list(target.named_buffers())
        if not named_params:
            raise ConfigError(f"module {self.module!r} has no parameters to average")
        self._param_names = [name for name, _ in named_params]
        self._buffer_names = [name for name, _ in named_buffers]
        self._params = [param for _, param in named_params]
        self._buffers = [buffer for _, buffer in named_buffers]
        with torch.no_grad():
            self._ema_params = [_local(param).detach().clone() for param in self._params]
            self._ema_buffers = [buffer.detach().clone() for buffer in self._buffers]
        self._swapped = None
        self.samples_seen, self.updates = 0, 0
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending)

    @property
    def attached(self) -> bool:
        return self._target is not None

    # ---------------------------------------------------------------- events

    def on_fit_start(self, run: RunState) -> None:
        self.attach(run.model)
        self._logged_eval = False

    def on_batch_end(self, run: RunState) -> None:
        ctx = run.context
        if ctx is not None and not ctx.is_update_step:
            return
        count = 1 if ctx is None else ctx.micro_count
        world = 1 if ctx is None else ctx.world.world_size
        self.update(run.config.batch_size * world * count)

    def on_eval_start(self, run: RunState) -> None:
        if not self.use_for_eval:
            return
        if not self._logged_eval and run.is_main_process and run.log is not None:
            run.log.info(f"evaluation uses the EMA weights of {self._describe()}")
            self._logged_eval = True
        self._swap_in()

    def on_eval_end(self, run: RunState) -> None:
        if self.use_for_eval:
            self._swap_out()

    def on_exception(self, run: RunState) -> None:
        self._swap_out()  # a checkpoint on the exception saves the raw weights

    def on_fit_end(self, run: RunState) -> None:
        self._swap_out()
        if not self.export:
            return
        if is_sharded_model(run.model):  # gathered to rank 0 on every rank: collective
            if run.config.output_dir is None:  # (rank 0 has a run folder exactly then)
                return
            from engine.checkpoint.sharded import full_model_state  # imports DCP: only here

            with self.applied():
                state = full_model_state(run.model)  # an empty dict on the other ranks
        elif run.is_main_process and run.run_dir is not None:
            with self.applied():
                state = {
                    key: value.detach().to("cpu", copy=True)
                    for key, value in run.model.state_dict().items()
                }
        else:
            return
        if run.is_main_process and run.run_dir is not None:
            run.paths["model_ema"] = export_weights(run.run_dir / EXPORT_FILENAME, state)

    # ---------------------------------------------------------------- the average

    def update(self, window_samples: int) -> None:
        """One EMA step after an optimiser step that consumed ``window_samples`` samples."""
        if self._target is None:
            raise ConfigError("EMA.update before attach(model) (FIT_START attaches it)")
        beta = beta_for(self.samples_seen, window_samples, self.half_life, self.decay, self.rampup)
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, [_local(p) for p in self._params], 1.0 - beta)
            if self._buffers:
                torch._foreach_copy_(self._ema_buffers, self._buffers)
        self.samples_seen += int(window_samples)
        self.updates += 1

    @property
    def averaged(self) -> dict[str, torch.Tensor]:
        """The EMA parameters and buffers by their names in the module (live tensors; under
        FSDP each parameter's a ``DTensor`` viewing this rank's shard)."""
        params = [_sharded_like(ema, p) for ema, p in zip(self._ema_params, self._params)]
        return {
            **dict(zip(self._param_names, params)),
            **dict(zip(self._buffer_names, self._ema_buffers)),
        }

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the module for the duration of the block; the raw ones come back
        bitwise after it (also on an error). Nested use keeps the outer swap."""
        if self._swapped is not None:
            yield
            return
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    def _swap_in(self) -> None:
        if self._target is None:
            raise ConfigError("the EMA weights can not be applied before attach(model)")
        if self._swapped is not None:
            return
        reshard(self._units)
        with torch.no_grad():
            live = self._live()
            self._swapped = [tensor.clone() for tensor in live]
            torch._foreach_copy_(live, self._ema_params + self._ema_buffers)

    def _swap_out(self) -> None:
        saved, self._swapped = self._swapped, None
        if saved is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._live(), saved)
        reshard(self._units)

    def _live(self) -> list[torch.Tensor]:
        """The module's parameters (this rank's shards under FSDP) and buffers, detached."""
        return [_local(t).detach() for t in [*self._params, *self._buffers]]

    def _describe(self) -> str:
        return "the whole model" if self.module is None else f"model.{self.module}"

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The EMA by name, its sample and update counters. Under FSDP the parameters are
        gathered whole to the CPU (collective: every rank calls it, as checkpoints do)."""
        if self._target is None and self._pending is not None:
            return dict(self._pending)
        with torch.no_grad():
            params = [_full(ema, p) for ema, p in zip(self._ema_params, self._params)]
        return {
            "module": self.module,
            "samples_seen": self.samples_seen,
            "updates": self.updates,
            "params": dict(zip(self._param_names, params)),
            "buffers": dict(zip(self._buffer_names, self._ema_buffers)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a saved EMA; before FIT_START it waits until the model is known."""
        for key in ("module", "samples_seen", "updates", "params", "buffers"):
            if key not in state:
                raise KeyError(f"EMA state has no {key!r} entry; entries: {sorted(state)}")
        if state["module"] != self.module:
            raise ValueError(
                f"the saved EMA averages module {state['module']!r}; this EMA averages "
                f"{self.module!r}"
            )
        if self._target is None:
            self._pending = state
            return
        self._load(state)

    def _load(self, state: Mapping[str, Any]) -> None:
        """Copy a saved EMA in (full tensors: under FSDP each rank takes its shard of them);
        every entry is checked before anything changes."""
        groups = (
            ("params", self._param_names, self._ema_params, self._params),
            ("buffers", self._buffer_names, self._ema_buffers, self._buffers),
        )
        for kind, names, _, likes in groups:
            saved = state[kind]
            if sorted(saved) != sorted(names):
                raise CheckpointError(
                    f"the saved EMA {kind} of {self._describe()} are {sorted(saved)[:5]}; the "
                    f"module has {sorted(names)[:5]}"
                )
            for name, like in zip(names, likes):
                value = saved[name]
                if value.shape != like.shape or value.dtype != like.dtype:
                    raise CheckpointError(
                        f"the saved EMA entry {name!r} is {tuple(value.shape)} {value.dtype}; "
                        f"the module's is {tuple(like.shape)} {like.dtype}"
                    )
        with torch.no_grad():
            for kind, names, tensors, likes in groups:
                for name, tensor, like in zip(names, tensors, likes):
                    tensor.copy_(_shard_of(state[kind][name], like))
        self.samples_seen = int(state["samples_seen"])
        self.updates = int(state["updates"])

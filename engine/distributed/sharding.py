"""FSDP2 (``torch.distributed.fsdp.fully_shard``), opt-in, for models whose parameters,
gradients and optimiser state do not fit one device.

``shard_model`` shards a placed model (every rank holding rank 0's weights) on a ``DeviceMesh``:
1-D over all ranks, or 2-D ``(replicate, shard)`` for HSDP (shard within a node, replicate
across nodes). Units, innermost first: every submodule whose class is named in
``ShardingPlan.blocks`` (a VAE's residual blocks, a transformer's layers), then each role's
submodule that exists (``encoder``, ``decoder``, ``discriminator``: so no unit mixes roles of
the default parameter groups), then the root. Each unit's parameters become ``DTensor`` shards;
a unit's parameters are all-gathered before its forward and its gradients reduce-scattered
(averaged) during the backward, overlapping the rest of it. ``param_dtype="bf16"`` is the
precision path under FSDP: ``MixedPrecisionPolicy`` (bf16 parameters in compute, fp32
reduction, fp32 sharded master weights) instead of autocast.

Isolation under sharding. ``loss.backward(inputs=<sharded parameters>)`` silently produces no
gradient: the graph's leaves are the unsharded parameters FSDP all-gathered, not the sharded ones
the optimiser steps. ``sharded_backward`` therefore back-propagates into the unsharded
parameters of the role (``backward(inputs=<their unsharded parameters>)``, found through FSDP2's
record of each sharded parameter): autograd computes only what reaches them, the other roles'
units are not all-gathered again for this backward unless the path to the role runs through
them, and FSDP reduce-scatters only the role's gradients (a unit whose parameters received none
is skipped). Each role's gradient is exactly the average over the ranks of its own loss's
gradient, with neither the compute nor the communication of the others'. Where this torch keeps
that record elsewhere (a private structure of FSDP2, checked on every call), it falls back to a
plain backward that drops what leaked into the other roles: correct, at the price of computing
and reduce-scattering their gradients too.

Accumulation. Every micro-batch's backward reduce-scatters (FSDP's ``no_sync`` would keep the
unsharded gradients, model-sized, on every rank, and would accumulate the leaks where they can
not be told apart); the sharded gradients accumulate.

Model methods used outside ``forward`` (a decoder's ``logits``, ``sample()``) do not all-gather
by themselves: name them in ``ShardingPlan.forward_methods`` (dotted for a submodule's,
``"decoder.logits"``) and they are registered with FSDP; a name the model lacks is an error.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from engine.config.validators import (
    is_bool,
    list_as_tuple,
    mesh_shape,
    names_tuple,
    one_of,
    optional,
)
from engine.distributed.collectives import World
from engine.errors import ConfigError, DistributedError

ROLE_MODULES = ("encoder", "decoder", "discriminator")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.frozen
class ShardingPlan:
    """How ``shard_model`` shards: ``blocks`` (module class names sharded as their own units),
    ``mesh`` (None: 1-D over every rank; ``(replicate, shard)``: HSDP), ``param_dtype``
    (``"bf16"``: mixed precision with fp32 reduction), ``reshard_after_forward`` (free the
    gathered parameters after each unit's forward: less memory, one more all-gather in the
    backward) and ``forward_methods`` (model methods run outside ``forward``)."""

    blocks: tuple[str, ...] = attrs.field(
        default=(), converter=list_as_tuple, validator=names_tuple
    )
    mesh: tuple[int, ...] | None = attrs.field(
        default=None, converter=list_as_tuple, validator=mesh_shape
    )
    param_dtype: str | None = attrs.field(default=None, validator=optional(one_of(*_DTYPES)))
    reshard_after_forward: bool = attrs.field(default=True, validator=is_bool)
    forward_methods: tuple[str, ...] = attrs.field(
        default=(), converter=list_as_tuple, validator=names_tuple
    )


@attrs.define(eq=False)
class Sharding:
    """A sharded model: its mesh, its FSDP units (innermost first, the root last), its
    trainable parameters (the sharded ones the optimisers step) and FSDP2's record of each
    sharded parameter (``FSDPParam``, by the sharded parameter's id: where its unsharded
    parameter, the graph's leaf, lives; empty where this torch keeps it elsewhere)."""

    model: nn.Module
    mesh: DeviceMesh
    units: list[nn.Module]
    trainable: list[nn.Parameter]
    records: dict[int, object] = attrs.field(factory=dict)


def build_mesh(plan: ShardingPlan, world: World, device: torch.device) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh  # ~1 s to import: only here

    """The plan's mesh over ``world``; a shape whose product is not the world size, or FSDP in
    one process without a process group, is an error naming it."""
    if not world.is_distributed:
        raise DistributedError(
            "FSDP shards the model across the ranks of a process group; this is one process "
            "(launch with torchrun, e.g. `torchrun --nproc-per-node=2 train.py`)"
        )
    shape = plan.mesh or (world.world_size,)
    if math.prod(shape) != world.world_size:
        raise ConfigError(
            f"mesh {shape} has {math.prod(shape)} ranks but the world has {world.world_size}"
        )
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def shard_model(
    model: nn.Module, plan: ShardingPlan, world: World, device: torch.device
) -> Sharding:
    """Shard ``model`` (placed on ``device``, identical on every rank) in place; what the
    plan names that the model lacks is an error before anything is sharded."""
    from torch.distributed.fsdp import (  # about a second to import: only runs that shard
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    _check_methods(model, plan.forward_methods)
    units = _units(model, plan)
    mesh = build_mesh(plan, world, device)
    policy = (
        MixedPrecisionPolicy(param_dtype=_DTYPES[plan.param_dtype], reduce_dtype=torch.float32)
        if plan.param_dtype is not None
        else MixedPrecisionPolicy()
    )
    for unit in units:
        if any(p.requires_grad for p in unit.parameters()):
            fully_shard(
                unit,
                mesh=mesh,
                mp_policy=policy,
                reshard_after_forward=plan.reshard_after_forward,
            )
    for path in plan.forward_methods:
        owner_path, _, method = path.rpartition(".")
        register_fsdp_forward_method(model.get_submodule(owner_path), method)
    sharded: list[nn.Module] = [unit for unit in model.modules() if isinstance(unit, FSDPModule)]
    _initialise_now(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Sharding(model, mesh, sharded, trainable, _records(sharded))


def _initialise_now(model: nn.Module) -> None:
    """Run FSDP2's lazy initialisation now, while every parameter the strategies will train
    requires grad, rather than at the model's first forward.

    Why: at its initialisation FSDP2 takes each unit's original and reduce dtypes (those of
    the ``MixedPrecisionPolicy``) from the unit's parameters that require grad *at that
    moment*. A unit whose parameters are all frozen then (a role switched off with
    ``requires_grad_(False)`` for the first step, or a discriminator frozen during the
    generator's phase when that phase comes first) gets neither; once unfrozen, its bf16
    gradients are reduce-scattered in bf16 and assigned as they are to the fp32 shards, and the
    backward fails: "attempting to assign a gradient with dtype 'c10::BFloat16' to a tensor
    with grad_dtype 'Float'". Initialised here, the dtypes follow what is trainable when the
    model is sharded, and FSDP2 does not initialise again. (``Engine.fit`` was safe already:
    its pre-flight forward comes first; a loop of one's own around ``shard_model`` was not.)
    The hook is private to FSDP2 (``_get_fsdp_state()._lazy_init``); where this torch lacks
    it, initialisation stays at the first forward."""
    state = getattr(model, "_get_fsdp_state", None)
    initialise = getattr(state(), "_lazy_init", None) if callable(state) else None
    if callable(initialise):
        initialise()


def _records(units: Sequence[nn.Module]) -> dict[int, object]:
    """FSDP2's ``FSDPParam`` of each sharded parameter of ``units``, by the parameter's id.
    It is private to FSDP2 (``FSDPModule._get_fsdp_state()._fsdp_param_groups``): anything
    missing gives an empty record and ``sharded_backward`` its plain, leak-dropping path."""
    records: dict[int, object] = {}
    for unit in units:
        state = getattr(unit, "_get_fsdp_state", None)
        groups = getattr(state(), "_fsdp_param_groups", None) if callable(state) else None
        for group in groups or ():
            for record in getattr(group, "fsdp_params", ()):
                sharded = getattr(record, "sharded_param", None)
                if isinstance(sharded, nn.Parameter):
                    records[id(sharded)] = record
    return records


def _units(model: nn.Module, plan: ShardingPlan) -> list[nn.Module]:
    """The modules to shard, innermost first: the plan's blocks, the role submodules, the
    root. A block name that matches no module class is an error naming the classes."""
    units: list[nn.Module] = [
        module
        for module in model.modules()
        if module is not model and type(module).__name__ in plan.blocks
    ]
    missing = sorted(set(plan.blocks) - {type(unit).__name__ for unit in units})
    if missing:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"FSDP blocks {missing} name no module class of {type(model).__name__}; "
            f"its classes are {present}"
        )
    units.reverse()  # children before their parents
    taken = {id(unit) for unit in units}
    for name in ROLE_MODULES:
        role = getattr(model, name, None)
        if isinstance(role, nn.Module) and id(role) not in taken:
            units.append(role)
    units.append(model)
    return units


def _check_methods(model: nn.Module, paths: Sequence[str]) -> None:
    for path in paths:
        owner_path, _, method = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            owner = None
        if owner is None or not callable(getattr(owner, method, None)):
            raise ConfigError(
                f"FSDP forward method {path!r}: {type(model).__name__} has no method "
                f"{method!r} at {owner_path or 'the root'}"
            )
        if owner_path and not isinstance(owner, nn.Module):
            raise ConfigError(f"FSDP forward method {path!r}: {owner_path!r} is not a module")


def sharded_backward(
    sharding: Sharding, loss: torch.Tensor, own: Sequence[nn.Parameter], retain_graph: bool
) -> None:
    """``loss.backward()`` into the ``own`` sharded parameters only (the module docstring's
    "Isolation under sharding"): into their unsharded parameters where FSDP2's records say
    which they are, else (or where none of them was gathered yet) a plain backward whose leaks
    into the other parameters are dropped."""
    leaves = gathered_leaves(sharding, own)
    if leaves:
        loss.backward(inputs=leaves, retain_graph=retain_graph)
        return
    with _dropping_leaks(sharding, own):
        loss.backward(retain_graph=retain_graph)


def gathered_leaves(sharding: Sharding, own: Sequence[nn.Parameter]) -> list[torch.Tensor] | None:
    """The unsharded parameters (the graph's leaves) of the sharded parameters ``own``: those
    FSDP gathered at least once (one never gathered is in no graph). None where a parameter's
    record is missing or no longer its own (this torch keeps them elsewhere)."""
    leaves: list[torch.Tensor] = []
    for param in own:
        record = sharding.records.get(id(param))
        if record is None or getattr(record, "sharded_param", None) is not param:
            return None
        leaf = getattr(record, "_unsharded_param", None)
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            leaves.append(leaf)
    return leaves


@contextlib.contextmanager
def _dropping_leaks(sharding: Sharding, own: Sequence[nn.Parameter]) -> Iterator[None]:
    """Around a plain ``loss.backward()``: only ``own`` parameters keep what it writes. Every
    other trainable parameter's gradient is set aside during the backward and put back after
    it, so the gradient the backward leaked into it is dropped; ``own`` accumulate."""
    mine = {id(param) for param in own}
    others = [param for param in sharding.trainable if id(param) not in mine]
    kept = [param.grad for param in others]
    for param in others:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in zip(others, kept):
            param.grad = grad


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``DTensor``. Until ``torch.distributed.tensor`` is imported (about
    a second, paid only by runs that shard) nothing can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _is_fsdp_module(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module`` (never, until ``torch.distributed.fsdp`` is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` are FSDP2's sharded parameters (``DTensor``)."""
    return bool(params) and is_dtensor(params[0])


def local_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor's local shard)."""
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
        total += local.numel() * local.element_size()
    return total


def training_bytes(
    params: Sequence[nn.Parameter], optimizers: Sequence[torch.optim.Optimizer]
) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimiser state."""
    state = [
        value
        for optimizer in optimizers
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "parameters": local_bytes(list(params)),
        "gradients": local_bytes([p.grad for p in params]),
        "optimizer": local_bytes(state),
    }


def is_sharded_model(model: nn.Module) -> bool:
    """Whether FSDP2 sharded ``model`` or one of its submodules (its forwards are then
    collective: every rank must run as many)."""
    return any(_is_fsdp_module(module) for module in model.modules())


def model_class_name(model: nn.Module) -> str:
    """The class name of ``model`` as its author wrote it (FSDP2 gives a sharded module a class
    of its own, ``FSDP<name>``)."""
    if _is_fsdp_module(model):
        fsdp_module = sys.modules["torch.distributed.fsdp"].FSDPModule
        for cls in type(model).__mro__[1:]:
            if issubclass(cls, nn.Module) and not issubclass(cls, fsdp_module):
                return cls.__name__
    return type(model).__name__

"""What every rank of a 2-process gloo world runs for ``tests/engine/test_fsdp.py``.

A hand-written GAN loop (the strategies' step order: one forward for both roles, or sequential
phases with ``n_critic``; accumulation; Adam built as the engine builds it) runs under two ways
of averaging: FSDP2 (``engine/distributed/sharding.py``: ``fully_shard`` per role and block,
plain backward, leaked gradients dropped) and DDP per role (``replication.py``). Before every
optimiser step the rank checks the role's gradient against the explicit average over the ranks
of its isolated local gradient, computed on an unsharded copy at the same parameters (full
tensors gathered from the shards). The test compares the two trajectories, and the bytes each
rank holds for parameters, gradients and optimiser state under each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from engine.config.specs import OptimizerSpec
from engine.context import StepContext
from engine.distributed.collectives import World, broadcast_module
from engine.distributed.replication import finish_window, gradient_sync
from engine.distributed.session import leave_process_group
from engine.distributed.sharding import (
    Sharding,
    ShardingPlan,
    shard_model,
    sharded_backward,
    training_bytes,
)
from engine.errors import StrategyError
from engine.state import Progress
from tests.engine.ddp_worker import Gan, free_port, global_batches, share

WINDOWS = 4
ROLES = {"generator": "autoencoder_loss", "discriminator": "discriminator_loss"}


@attrs.frozen
class Case:
    """A GAN loop: ``sequential`` phases (the generator every ``n_critic`` windows) or one
    forward for both roles; ``micro_count`` micro-batches per window; FSDP's plan."""

    sequential: bool = False
    n_critic: int = 1
    micro_count: int = 1
    plan: ShardingPlan = attrs.field(factory=ShardingPlan)
    batchnorm: bool = False


CASES = {
    "one forward": Case(),
    "two-phase n_critic 2, accumulation 2": Case(sequential=True, n_critic=2, micro_count=2),
    "blocks as units": Case(plan=ShardingPlan(blocks=("Linear",))),
    "BatchNorm discriminator two-phase": Case(sequential=True, batchnorm=True),
}
BF16 = Case(plan=ShardingPlan(param_dtype="bf16"))


@attrs.define(eq=False)
class Holder:
    """A role's parameters and replica (``ReplicaHolder``) for the DDP runs."""

    name: str
    params: list[nn.Parameter]
    replica: Any = None

    @property
    def role(self) -> str:
        return self.name


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def role_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    disc = {id(p) for p in model.discriminator.parameters()}  # type: ignore[union-attr]
    return {
        "generator": [p for p in model.parameters() if id(p) not in disc],
        "discriminator": list(model.discriminator.parameters()),  # type: ignore[union-attr]
    }


def step_context(world: World) -> StepContext:
    return StepContext(
        device=torch.device("cpu"),
        precision="fp32",
        autocast=contextlib.nullcontext,
        scaler=None,
        grad_clip_norm=None,
        nonfinite="raise",
        progress=Progress(),
        world=world,
    )


@attrs.define(eq=False)
class Loop:
    """The GAN loop under ``mode`` (``"fsdp"`` or ``"ddp"``), with its gradient checks."""

    case: Case
    mode: str
    world: World
    model: nn.Module
    sharding: Sharding | None
    params: dict[str, list[nn.Parameter]]
    optimizers: dict[str, torch.optim.Optimizer]
    holders: dict[str, Holder]
    ctx: StepContext
    errors: list[tuple[int, str, float]] = attrs.field(factory=list)

    def backward(self, role: str, loss: torch.Tensor, retain: bool, sync: bool) -> None:
        if self.sharding is not None:
            sharded_backward(self.sharding, loss, self.params[role], retain)
        else:
            with gradient_sync([self.holders[role]], loss, self.ctx, sync):
                loss.backward(inputs=self.params[role], retain_graph=retain)

    def step(self, role: str, window: int, at: dict[str, torch.Tensor], batches: list[Any]) -> None:
        if self.sharding is None:
            finish_window(self.holders[role], self.ctx)
        self.check(role, window, at, batches)
        self.optimizers[role].step()
        self.optimizers[role].zero_grad(set_to_none=True)

    def check(
        self, role: str, window: int, at: dict[str, torch.Tensor], batches: list[Any]
    ) -> None:
        """The role's gradient against the explicit average of the isolated local ones at
        the parameters ``at``."""
        reference = Gan(batchnorm=self.case.batchnorm)
        reference.load_state_dict(at, strict=False)
        named = dict(reference.named_parameters())
        names = [n for n, p in self.model.named_parameters() if id(p) in self._ids(role)]
        params = [named[name] for name in names]
        total = [torch.zeros_like(p) for p in params]
        kwargs = {"phase": "discriminator" if role == "discriminator" else "generator"}
        for batch in batches:
            out = reference(batch, **(kwargs if self.case.sequential else {}))
            grads = torch.autograd.grad(out[ROLES[role]] / len(batches), params)
            total = [t + g for t, g in zip(total, grads)]
        for tensor in total:
            dist.all_reduce(tensor)
            tensor.div_(self.world.world_size)
        live = dict(self.model.named_parameters())
        actual = [full(live[name].grad) for name in names]  # type: ignore[arg-type]
        error = max(float((t - a).abs().max()) for t, a in zip(total, actual))
        self.errors.append((window, role, error))

    def _ids(self, role: str) -> set[int]:
        return {id(p) for p in self.params[role]}

    def window(self, window: int, batches: list[torch.Tensor]) -> None:
        last = len(batches) - 1
        start = full_parameters(self.model)
        if not self.case.sequential:
            for micro, batch in enumerate(batches):
                out, sync = self.model(batch), micro == last
                for index, (role, key) in enumerate(ROLES.items()):
                    self.backward(role, out[key] / len(batches), index == 0, sync)
            for role in ROLES:
                self.step(role, window, start, batches)
            return
        for micro, batch in enumerate(batches):
            loss = self.model(batch, phase="discriminator")[ROLES["discriminator"]]
            self.backward("discriminator", loss / len(batches), False, micro == last)
        self.step("discriminator", window, start, batches)
        if window % self.case.n_critic == self.case.n_critic - 1:
            now = full_parameters(self.model)
            for micro, batch in enumerate(batches):
                loss = self.model(batch, phase="generator")[ROLES["generator"]]
                self.backward("generator", loss / len(batches), False, micro == last)
            self.step("generator", window, now, batches)


def make_loop(case: Case, mode: str, world: World) -> Loop:
    torch.manual_seed(world.rank)  # ranks start different: rank 0's weights are broadcast
    model = Gan(batchnorm=case.batchnorm)
    broadcast_module(model, world)
    sharding = None
    if mode == "fsdp":
        sharding = shard_model(model, case.plan, world, torch.device("cpu"))
    params = role_params(model)
    adam = OptimizerSpec("Adam", lr=0.02)
    optimizers = {role: adam.build(ps, torch.device("cpu")) for role, ps in params.items()}
    holders = {role: Holder(role, ps) for role, ps in params.items()}
    return Loop(
        case, mode, world, model, sharding, params, optimizers, holders, step_context(world)
    )


def run_case(case: Case, mode: str, world: World) -> dict[str, Any]:
    loop = make_loop(case, mode, world)
    k = case.micro_count
    batches = global_batches(WINDOWS, k)
    digests = []
    for window in range(WINDOWS):
        loop.window(window, [share(b, world) for b in batches[window * k : (window + 1) * k]])
        flat = torch.cat([p.flatten() for p in full_parameters(loop.model).values()])
        digests.append(hashlib.sha256(flat.float().numpy().tobytes()).hexdigest())
    return {
        "errors": loop.errors,
        "digests": digests,
        "params": full_parameters(loop.model),
        "sharded": all(isinstance(p, DTensor) for p in loop.model.parameters()),
        "units": 0 if loop.sharding is None else len(loop.sharding.units),
    }


def memory(mode: str, world: World) -> dict[str, int]:
    """Bytes of parameters, gradients and Adam state on this rank after one step of a model
    with 64-wide layers (small enough to run, big enough that padding is negligible)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    if mode == "fsdp":
        shard_model(model, ShardingPlan(blocks=("Linear",)), world, torch.device("cpu"))
    params = list(model.parameters())
    optimizer = OptimizerSpec("Adam", lr=1e-3).build(params, torch.device("cpu"))
    x = torch.randn(4, 64)
    if mode == "ddp":  # gradients are views of DDP's buckets: their bytes count once
        holder, ctx, loss = Holder("model", params), step_context(world), model(x).pow(2).mean()
        with gradient_sync([holder], loss, ctx, True):
            loss.backward()
        finish_window(holder, ctx)
    else:
        model(x).pow(2).mean().backward()
    optimizer.step()
    return training_bytes(params, [optimizer])


def reduced_units(world: World) -> dict[str, int]:
    """How many FSDP units each role's backward reduce-scatters (FSDP2's profiler label
    ``FSDP::post_backward_reduce``), on the one-forward GAN with every Linear a unit: the
    generator's 4 and the discriminator's 2, not all 6 (the other role's gradients are neither
    computed nor reduce-scattered)."""
    loop = make_loop(Case(plan=ShardingPlan(blocks=("Linear",))), "fsdp", world)
    out = loop.model(torch.randn(2, 5))
    counts = {}
    for index, (role, key) in enumerate(ROLES.items()):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loop.backward(role, out[key], index == 0, True)
        events = prof.events()
        counts[role] = sum(1 for e in events if e.name.startswith("FSDP::post_backward_reduce"))
    return counts


def frozen_first_forward(world: World, frozen: bool) -> dict[str, Any]:
    """Under the bf16 policy: a first forward with the discriminator frozen
    (``requires_grad_(False)``) and a generator step, then both roles' backwards with it
    unfrozen; every gradient after them (full tensors), or the error of the backward."""
    loop = make_loop(BF16, "fsdp", world)
    discriminator = loop.params["discriminator"]
    batch = share(global_batches(1, 1)[0], world)
    try:
        for param in discriminator:
            param.requires_grad_(not frozen)
        loop.backward("generator", loop.model(batch)["autoencoder_loss"], False, True)
        loop.optimizers["generator"].step()
        loop.optimizers["generator"].zero_grad(set_to_none=True)
        for param in discriminator:
            param.requires_grad_(True)
        out = loop.model(batch)
        for index, (role, key) in enumerate(ROLES.items()):
            loop.backward(role, out[key], index == 0, True)
    except RuntimeError as error:
        return {"error": str(error)}
    grads = {name: p.grad for name, p in loop.model.named_parameters()}
    return {"grads": {name: full(g) for name, g in grads.items() if g is not None}}


def isolated_backward_of_shards(world: World) -> str:
    """The error of the engine's isolated backward (``gradient_sync``) on sharded parameters:
    ``backward(inputs=<shards>)`` would silently leave them without a gradient."""
    loop = make_loop(Case(), "fsdp", world)
    loss = loop.model(torch.randn(2, 5))["discriminator_loss"]
    try:
        with gradient_sync([loop.holders["discriminator"]], loss, loop.ctx, True):
            loss.backward(inputs=loop.params["discriminator"])
    except StrategyError as error:
        return str(error)
    return "no error"


def _rank(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(folder)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        world = World(rank=rank, world_size=world_size)
        results: dict[str, Any] = {
            name: {mode: run_case(case, mode, world) for mode in ("fsdp", "ddp")}
            for name, case in CASES.items()
        }
        results["bf16"] = run_case(BF16, "fsdp", world)
        results["memory"] = {mode: memory(mode, world) for mode in ("fsdp", "ddp")}
        results["refusal"] = isolated_backward_of_shards(world)
        results["reduced units"] = reduced_units(world)
        # Last: without the fix its backward fails inside FSDP, leaving FSDP's state torn.
        results["frozen first"] = {
            frozen: frozen_first_forward(world, frozen) for frozen in (False, True)
        }
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_process_group()


def spawn(folder: Path, world_size: int = 2) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _rank,
        args=(world_size, free_port(), str(folder)),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

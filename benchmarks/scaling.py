"""Many processes: how gradients are averaged across ranks, what it costs, and weak scaling.

Three parts, each on N spawned ranks (gloo on the CPU, one thread per rank; nccl with
``--device cuda``, one GPU per rank):

* ``paths``: one training step of the same model and batch under each way of averaging
  gradients: the engine's **DDP per role** (``engine/distributed/replication.py``: one
  ``DistributedDataParallel`` per role, armed at the role's backward), the **previous path**
  (``collectives.average_gradients``: isolated backwards, then bucketed all-reduces), a
  **hand-written per-model DDP loop** (``DistributedDataParallel`` around each network, as
  PyTorch's DCGAN example), and ``Engine.fit`` end to end (DDP per role plus the engine's own
  work: data, metrics, events). Two workloads: an 8.4M-parameter MLP autoencoder (one role,
  ``Standard``) and the same with a 0.5M-parameter discriminator (two roles, ``Adversarial``).
  FSDP2 (``fully_shard`` per linear layer, ``engine/distributed/sharding.py``) is timed beside,
  twice for two roles: each role's backward into its own unsharded parameters (the engine's) and
  the earlier plain backward whose leaks into the other role are computed, reduce-scattered and
  dropped (``sharded_backward``'s fallback). One role (``Standard``) is a plain backward either way.
* ``overlap``: on the 8.4M-parameter autoencoder with 4 MiB buckets, when the first bucket's
  all-reduce starts relative to the end of the backward's computation (the last gradient
  written): negative means communication overlaps the backward. Also the backward's
  computation time and how long the step waits for communication after it ("exposed").
* ``memory``: bytes each rank holds for parameters, gradients and Adam state after a step of
  the two-role MLP, under DDP per role and under FSDP2 (``fully_shard`` per linear layer).
* ``weak``: weak scaling, 1 vs N processes with the same per-rank batch (throughput per
  process and efficiency = throughput(N) / (N x throughput(1))) for small models.

Times are wall-clock medians over ``--repeats`` interleaved repeats. On a shared CPU they are
noisy; compare the rows of one run. Run from the repository root::

    python benchmarks/scaling.py                  # paths, overlap, memory on 2 CPU ranks
    python benchmarks/scaling.py --parts weak     # weak scaling, 1 and 2 processes
    python benchmarks/scaling.py --device cuda --procs 2   # on a machine with 2 GPUs
    python benchmarks/scaling.py --tiny           # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from engine import Engine, EngineConfig, OptimizerSpec, RunState
from engine.context import StepContext
from engine.data.batches import batch_bounds, epoch_order
from engine.distributed.collectives import World, average_gradients, current_world
from engine.distributed.replication import RoleReplica, finish_window, gradient_sync
from engine.distributed.session import join_process_group, leave_process_group
from engine.distributed.sharding import ShardingPlan, shard_model, sharded_backward, training_bytes
from engine.state import Progress
from examples.models import VAE, AdversarialAE
from strategies import Adversarial, Standard

WIDTH = 1024  # input features of the MLP workloads
HIDDEN = 2048  # 1024 -> 2048 -> 2048 -> 1024: 8.4M parameters


# ---------------------------------------------------------------- models


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (inp, out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(inp, out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MlpGan(nn.Module):
    """An MLP autoencoder (``generator``, 8.4M parameters at the default sizes) and an MLP
    ``discriminator`` (0.5M) that scores inputs and reconstructions; single-forward losses."""

    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN, critic: bool = True) -> None:
        super().__init__()
        self.generator = mlp([width, hidden, hidden, width])
        self.discriminator = mlp([width, 512, 1]) if critic else None

    def losses(
        self, x: torch.Tensor, generator: nn.Module, discriminator: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        recon = generator(x)
        recon_loss = (recon - x).pow(2).mean()
        if discriminator is None:
            return {"loss": recon_loss}
        real, fake = discriminator(x), discriminator(recon)
        return {
            "loss": recon_loss,
            "autoencoder_loss": recon_loss + 0.1 * F.softplus(-fake).mean(),
            "discriminator_loss": F.softplus(-real).mean() + F.softplus(fake).mean(),
        }

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        return self.losses(batch["data"], self.generator, self.discriminator)


def size_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------- ways to average


class Role:
    """A ``ReplicaHolder``: one role's parameters and its replica (DDP per role)."""

    def __init__(self, role: str, params: list[nn.Parameter]) -> None:
        self._role, self.params = role, params
        self.replica: RoleReplica | None = None

    @property
    def role(self) -> str:
        return self._role


def step_context(world: World, device: torch.device) -> StepContext:
    return StepContext(
        device=device,
        precision="fp32",
        autocast=contextlib.nullcontext,
        scaler=None,
        grad_clip_norm=None,
        nonfinite="raise",
        progress=Progress(),
        world=world,
    )


class Trainer:
    """One way of averaging gradients around the same isolated step; ``step(x)`` trains one
    batch. ``mechanism``: ``per_role`` (the engine's), ``previous``, ``per_model_ddp``,
    ``fsdp`` (``fully_shard`` per linear layer, each role's backward into its own unsharded
    parameters), ``fsdp_dropping`` (the same, plain backward with the leaks dropped)."""

    def __init__(
        self,
        mechanism: str,
        gan: bool,
        device: torch.device,
        bucket_cap_mb: float = 25.0,
        width: int = WIDTH,
        hidden: int = HIDDEN,
    ) -> None:
        torch.manual_seed(0)
        self.model = MlpGan(width, hidden, critic=gan).to(device)
        self.mechanism, self.world = mechanism, current_world()
        self.ctx = step_context(self.world, device)
        self.sharding = None
        if mechanism in ("fsdp", "fsdp_dropping"):
            plan = ShardingPlan(blocks=("Linear",))
            self.sharding = shard_model(self.model, plan, self.world, device)
            if mechanism == "fsdp_dropping":  # no records: sharded_backward's fallback
                self.sharding.records.clear()
        generator, discriminator = self.model.generator, self.model.discriminator
        self.roles = {"generator": Role("generator", list(generator.parameters()))}
        if discriminator is not None:
            self.roles["discriminator"] = Role("discriminator", list(discriminator.parameters()))
        for role in self.roles.values():
            role.replica = RoleReplica(
                role.role,
                role.params,
                self.world,
                owner=weakref.ref(self.ctx),
                bucket_cap_mb=bucket_cap_mb,
            )
        self.generator: nn.Module = generator
        self.discriminator: nn.Module | None = discriminator
        if mechanism == "per_model_ddp" and self.world.is_distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.generator = DistributedDataParallel(
                generator, device_ids=ids, bucket_cap_mb=bucket_cap_mb
            )
            if discriminator is not None:
                self.discriminator = DistributedDataParallel(
                    discriminator, device_ids=ids, bucket_cap_mb=bucket_cap_mb
                )
        adam = OptimizerSpec("Adam", lr=1e-4)  # as the engine builds it (fused where it can)
        self.optimizers = {
            name: adam.build(role.params, device) for name, role in self.roles.items()
        }
        self.backward_started = 0.0
        self.sync_started: float | None = None
        self.synced = 0.0

    def keys(self) -> dict[str, str]:
        if self.discriminator is None:
            return {"generator": "loss"}
        return {"generator": "autoencoder_loss", "discriminator": "discriminator_loss"}

    def step(self, x: torch.Tensor) -> None:
        if self.sharding is not None:  # through the root's forward, as FSDP wants
            losses = self.model({"data": x})
        else:
            losses = self.model.losses(x, self.generator, self.discriminator)
        keys = self.keys()
        self.backward_started = time.perf_counter()
        self.sync_started = None
        for index, (name, key) in enumerate(keys.items()):
            role, retain = self.roles[name], index < len(keys) - 1
            # One role holds every parameter: a plain backward, as the engine's Standard.
            inputs = None if len(keys) == 1 else role.params
            if self.mechanism == "per_role":
                with gradient_sync([role], losses[key], self.ctx, sync=True):
                    losses[key].backward(inputs=inputs, retain_graph=retain)
            elif self.sharding is not None and len(keys) == 1:  # as the engine's Standard
                losses[key].backward()
            elif self.sharding is not None:
                sharded_backward(self.sharding, losses[key], role.params, retain)
            else:
                losses[key].backward(inputs=inputs, retain_graph=retain)
        for role in self.roles.values():
            if self.mechanism == "per_role":
                finish_window(role, self.ctx)
            elif self.mechanism == "previous":
                if self.sync_started is None:
                    self.sync_started = time.perf_counter()
                average_gradients(role.params, self.world)
        self.synced = time.perf_counter()
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(
    trainer: Trainer, data: torch.Tensor, warmup: int, steps: int, device: torch.device
) -> float:
    """Milliseconds per step, after ``warmup`` steps."""
    for index in range(warmup):
        trainer.step(data[index % len(data)])
    _sync(device)
    started = time.perf_counter()
    for index in range(steps):
        trainer.step(data[index % len(data)])
    _sync(device)
    return (time.perf_counter() - started) * 1000.0 / steps


class StepClock:
    """Wall time from the end of warm-up step ``warmup`` to the end of the run."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.started: float | None = None
        self.stopped: float | None = None

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step == self.warmup:
            _sync(self.device)
            self.started = time.perf_counter()

    def on_fit_end(self, run: RunState) -> None:
        _sync(self.device)
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        assert self.started is not None and self.stopped is not None
        return self.stopped - self.started


def time_engine(
    gan: bool, data: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> float:
    """Milliseconds per ``Engine.fit`` step on the same model and per-rank batch."""
    torch.manual_seed(0)
    model = MlpGan(args.width, args.hidden, critic=gan)
    adam = OptimizerSpec("Adam", lr=1e-4)
    strategy: Any = Adversarial(generator=adam, discriminator=adam) if gan else Standard(adam)
    clock = StepClock(args.warmup, device)
    config = EngineConfig(
        epochs=10_000,
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        device=str(device),
        output_dir=None,
        log_every=10_000,
        shuffle=False,
    )
    # The same global data on every rank; the engine gives each rank its share of each batch.
    samples = len(data) * args.batch * current_world().world_size
    flat = torch.randn(samples, args.width, generator=torch.Generator().manual_seed(0))
    Engine(strategy, config, [clock]).fit(model, {"data": flat})
    return clock.seconds * 1000.0 / args.steps


PATHS = (
    "DDP per role (engine)",
    "previous path",
    "hand-written per-model DDP",
    "FSDP2 per layer",
    "FSDP2, leaks dropped (before)",
    "Engine.fit",
)
MECHANISMS = {
    "DDP per role (engine)": "per_role",
    "previous path": "previous",
    "hand-written per-model DDP": "per_model_ddp",
    "FSDP2 per layer": "fsdp",
    "FSDP2, leaks dropped (before)": "fsdp_dropping",
}
DROPPING = "FSDP2, leaks dropped (before)"
OVERLAP = ("DDP per role (engine)", "previous path", "hand-written per-model DDP")


def measure_paths(
    args: argparse.Namespace, device: torch.device, data: torch.Tensor
) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per step of each path, per workload, every repeat (interleaved)."""
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for gan in (False, True):
            workload = "two roles (Adversarial)" if gan else "one role (Standard)"
            order = PATHS[repeat % len(PATHS) :] + PATHS[: repeat % len(PATHS)]
            for path in order:
                if path == DROPPING and not gan:  # one role: nothing leaks, the same backward
                    continue
                if path == "Engine.fit":
                    ms = time_engine(gan, data, args, device)
                else:
                    trainer = Trainer(MECHANISMS[path], gan, device, 25.0, args.width, args.hidden)
                    ms = time_trainer(trainer, data, args.warmup, args.steps, device)
                results.setdefault(workload, {}).setdefault(path, []).append(ms)
    return results


# ------------------------------------------------------------------ overlap


class Stamps:
    """Times of one backward: each gradient written, each bucket's all-reduce launched."""

    def __init__(self) -> None:
        self.grads: list[float] = []
        self.buckets: list[float] = []


def timed_allreduce(state: Stamps, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce (divide, sum), with its launch time noted. (No annotations:
    DDP compares them with its own types, which this module's postponed ones are not.)"""
    state.buckets.append(time.perf_counter())
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()  # type: ignore[union-attr]
    return future.then(lambda done: done.value()[0])


def measure_overlap(
    args: argparse.Namespace, device: torch.device, data: torch.Tensor
) -> dict[str, list[dict[str, float]]]:
    """Per timed step of each path on the 8.4M autoencoder with 4 MiB buckets: backward
    compute, first all-reduce launch relative to its start and end, the exposed wait."""
    results: dict[str, list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        names = list(OVERLAP)
        for path in names[repeat % 3 :] + names[: repeat % 3]:
            trainer = Trainer(MECHANISMS[path], False, device, 4.0, args.width, args.hidden)
            stamps = Stamps()
            for param in trainer.roles["generator"].params:
                param.register_post_accumulate_grad_hook(
                    lambda _p, stamps=stamps: stamps.grads.append(time.perf_counter())
                )
            for index in range(max(args.warmup, 2)):  # two steps: DDP rebuilds its buckets
                trainer.step(data[index % len(data)])
            replica = trainer.roles["generator"].replica
            if path == "DDP per role (engine)" and replica is not None and replica.ddp:
                replica.ddp.register_comm_hook(stamps, timed_allreduce)
            if isinstance(trainer.generator, DistributedDataParallel):
                trainer.generator.register_comm_hook(stamps, timed_allreduce)
            for index in range(args.steps):
                stamps.grads.clear()
                stamps.buckets.clear()
                trainer.step(data[index % len(data)])
                _sync(device)
                start, computed = trainer.backward_started, max(stamps.grads)
                first = stamps.buckets[0] if stamps.buckets else trainer.sync_started
                assert first is not None
                results.setdefault(path, []).append(
                    {
                        "compute": (computed - start) * 1000.0,
                        "first_after_start": (first - start) * 1000.0,
                        "first_after_end": (first - computed) * 1000.0,
                        "exposed": (trainer.synced - computed) * 1000.0,
                        "buckets": float(len(stamps.buckets) or 1),
                    }
                )
    return results


# ------------------------------------------------------------------ memory


def measure_memory(
    args: argparse.Namespace, device: torch.device, data: torch.Tensor
) -> dict[str, dict[str, int]]:
    """This rank's bytes of parameters, gradients and Adam state after one step of the
    two-role MLP, under DDP per role and under FSDP2."""
    results = {}
    for path in ("DDP per role (engine)", "FSDP2 per layer"):
        trainer = Trainer(MECHANISMS[path], True, device, 25.0, args.width, args.hidden)
        trainer.step(data[0])
        losses = trainer.model({"data": data[1]})
        for name, key in trainer.keys().items():
            role = trainer.roles[name]
            if trainer.sharding is not None:
                sharded_backward(trainer.sharding, losses[key], role.params, True)
            else:
                with gradient_sync([role], losses[key], trainer.ctx, sync=True):
                    losses[key].backward(inputs=role.params, retain_graph=True)
        params = [p for role in trainer.roles.values() for p in role.params]
        results[path] = training_bytes(params, list(trainer.optimizers.values()))
    return results


# ---------------------------------------------------------- weak scaling


def weak_engine_run(
    workload: str, data: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> float:
    """Seconds for ``args.steps`` engine steps after the warm-up."""
    torch.manual_seed(0)
    if workload == "VAE (Standard)":
        model: nn.Module = VAE(input_shape=(1, 8, 8))
        strategy: Any = Standard(OptimizerSpec("Adam", lr=1e-3))
    else:
        model = AdversarialAE(input_shape=(1, 8, 8))
        strategy = Adversarial(
            generator=OptimizerSpec("Adam", lr=1e-3), discriminator=OptimizerSpec("Adam", lr=1e-3)
        )
    clock = StepClock(args.warmup, device)
    config = EngineConfig(
        epochs=10_000,
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        device=str(device),
        output_dir=None,
        log_every=100,
    )
    Engine(strategy, config, [clock]).fit(model, {"data": data})
    return clock.seconds


def weak_ddp_run(data: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    """The same VAE steps in a hand-written loop over a ``DistributedDataParallel`` model."""
    torch.manual_seed(0)
    model: nn.Module = VAE(input_shape=(1, 8, 8)).to(device)
    world = current_world()
    if world.is_distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = data.to(device)
    bounds = batch_bounds(len(data), args.batch, False, world)
    step, started = 0, 0.0
    for epoch in range(10_000):
        shuffled = data.index_select(0, epoch_order(len(data), 0, epoch, True).to(device))
        for lo, hi in bounds:
            loss = model({"data": shuffled[lo:hi]})["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.warmup:
                _sync(device)
                started = time.perf_counter()
            if step == args.warmup + args.steps:
                _sync(device)
                return time.perf_counter() - started
    raise AssertionError("not enough data for the steps asked")


WEAK: dict[str, Callable[..., float]] = {
    "VAE (Standard)": lambda data, args, device: weak_engine_run(
        "VAE (Standard)", data, args, device
    ),
    "adversarial AE (Adversarial)": lambda data, args, device: weak_engine_run(
        "adversarial AE (Adversarial)", data, args, device
    ),
    "VAE, hand-written DDP loop": weak_ddp_run,
}


def measure_weak(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    data = torch.rand(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, run in WEAK.items():
            seconds.setdefault(name, []).append(run(data, args, device))
    return seconds


# ------------------------------------------------------------------- ranks


def _rank_main(
    rank: int, nprocs: int, port: int, part: str, args: argparse.Namespace, out: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(args.threads)
    device = _device(args.device, rank)
    join_process_group(device.type, timeout_s=600.0)
    try:
        generator = torch.Generator().manual_seed(rank)
        data = torch.randn(8, args.batch, args.width, generator=generator).to(device)
        result: Any
        if part == "paths":
            result = measure_paths(args, device, data)
        elif part == "overlap":
            result = measure_overlap(args, device, data)
        elif part == "memory":
            result = measure_memory(args, device, data)
        else:
            result = measure_weak(args, device)
        if rank == 0:
            torch.save(result, Path(out) / f"{part}-procs{nprocs}.pt")
    finally:
        leave_process_group()


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", rank) if name == "cuda" else torch.device(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(part: str, nprocs: int, args: argparse.Namespace, out: str) -> Any:
    mp.start_processes(
        _rank_main,
        args=(nprocs, _free_port(), part, args, out),
        nprocs=nprocs,
        start_method="spawn",
    )
    return torch.load(Path(out) / f"{part}-procs{nprocs}.pt")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report_paths(results: dict[str, dict[str, list[float]]], nprocs: int) -> list[str]:
    lines = [
        f"Gradient averaging paths, {nprocs} ranks: ms per step, median (min-max) of repeats",
        "",
        "| workload | " + " | ".join(PATHS) + " |",
        "|---|" + "---|" * len(PATHS),
    ]
    for workload, paths in results.items():
        cells = [
            f"{_median(paths[p]):.1f} ({min(paths[p]):.1f}-{max(paths[p]):.1f})"
            if p in paths
            else "as FSDP2 per layer"
            for p in PATHS
        ]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return lines


def report_overlap(
    results: dict[str, list[dict[str, float]]], nprocs: int, parameters: int
) -> list[str]:
    lines = [
        f"Overlap, {nprocs} ranks, {parameters / 1e6:.1f}M-parameter MLP autoencoder, 4 MiB "
        "buckets: ms, median "
        "over timed steps of all repeats (first all-reduce relative to the end of the "
        "backward's computation: negative = overlapped)",
        "",
        "| path | backward compute | first all-reduce after backward start | first all-reduce "
        "after backward end | exposed communication | all-reduces |",
        "|---|---|---|---|---|---|",
    ]
    for path, steps in results.items():
        cell = {key: _median([s[key] for s in steps]) for key in steps[0]}
        lines.append(
            f"| {path} | {cell['compute']:.1f} | {cell['first_after_start']:.1f} | "
            f"{cell['first_after_end']:+.1f} | {cell['exposed']:.1f} | {cell['buckets']:.0f} |"
        )
    return lines


def report_memory(results: dict[str, dict[str, int]], nprocs: int) -> list[str]:
    ddp = sum(results["DDP per role (engine)"].values())
    lines = [
        f"Memory per rank, {nprocs} ranks, two-role MLP after a step: MiB of parameters, "
        "gradients and Adam state (local shards under FSDP2)",
        "",
        "| path | parameters | gradients | optimiser state | total | / DDP |",
        "|---|---|---|---|---|---|",
    ]
    for path, parts in results.items():
        mib = {key: value / 2**20 for key, value in parts.items()}
        total = sum(parts.values())
        lines.append(
            f"| {path} | {mib['parameters']:.1f} | {mib['gradients']:.1f} | "
            f"{mib['optimizer']:.1f} | {total / 2**20:.1f} | {total / ddp:.2f} |"
        )
    return lines


def report_weak(medians: dict[int, dict[str, float]], args: argparse.Namespace) -> list[str]:
    lines = [
        "Weak scaling (small models, batch per rank fixed)",
        "",
        "| workload | processes | samples/s (all ranks) | samples/s per process "
        "| scaling efficiency | engine / DDP time |",
        "|---|---|---|---|---|---|",
    ]
    for name in WEAK:
        base = args.steps * args.batch / medians[1][name]
        for nprocs in sorted(medians):
            total = args.steps * args.batch * nprocs / medians[nprocs][name]
            ratio = medians[nprocs][name] / medians[nprocs]["VAE, hand-written DDP loop"]
            versus = f"{ratio:.3f}" if name == "VAE (Standard)" else ""
            lines.append(
                f"| {name} | {nprocs} | {total:,.0f} | {total / nprocs:,.0f} "
                f"| {total / (nprocs * base):.3f} | {versus} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["paths", "overlap", "memory"],
        choices=["paths", "overlap", "memory", "weak"],
    )
    parser.add_argument("--procs", type=int, nargs="+", default=[2], help="ranks (weak: 1 N)")
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=15, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--samples", type=int, default=16_384, help="weak scaling's data")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a few small steps, to check it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.repeats, args.samples = 3, 2, 1, 2048
        args.width, args.hidden, args.batch = 64, 128, 8
    device = _device(args.device, 0)
    nprocs = max(args.procs)
    if device.type == "cuda" and nprocs > torch.cuda.device_count():
        parser.error(
            f"--procs {nprocs} on CUDA needs that many GPUs; "
            f"this machine has {torch.cuda.device_count()}"
        )
    print(
        f"device {device.type}, torch {torch.__version__}, {os.cpu_count()} CPU core(s), "
        f"{args.threads} thread(s) per rank, batch {args.batch} per rank, {args.steps} timed "
        f"steps after {args.warmup}, {args.repeats} repeats; MLP "
        f"{size_of(MlpGan(args.width, args.hidden, critic=False)):,} parameters "
        f"(+ discriminator {size_of(mlp([args.width, 512, 1])):,})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as out:
        for part in args.parts:
            if part == "paths":
                lines = report_paths(_spawn(part, nprocs, args, out), nprocs)
            elif part == "overlap":
                size = size_of(MlpGan(args.width, args.hidden, critic=False))
                lines = report_overlap(_spawn(part, nprocs, args, out), nprocs, size)
            elif part == "memory":
                lines = report_memory(_spawn(part, nprocs, args, out), nprocs)
            else:
                counts = sorted({1, *args.procs})
                medians = {
                    n: {k: _median(v) for k, v in _spawn(part, n, args, out).items()}
                    for n in counts
                }
                lines = report_weak(medians, args)
            print("\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scaling with processes: 1 vs N ranks, throughput per process and scaling efficiency.

Weak scaling: every rank trains with the same per-rank batch, so N ranks process N times the
samples of one step; perfect scaling keeps the throughput per process constant
(efficiency = throughput(N) / (N * throughput(1)), 1.0 is perfect). The baseline is the
1-process run of the same invocation. Each rank gets ``--threads`` CPU threads (on the CPU) or
its own GPU (``--device cuda`` needs N GPUs; nccl does not share one GPU between ranks). A
hand-written loop with ``DistributedDataParallel`` on the same model, data shard and optimiser
is timed beside the engine, as the reference for what the gradient averaging costs.

Workloads: an MLP VAE (``Standard``: one optimiser) and an adversarial AE (``Adversarial``: two
optimisers, two gradient averages per step). Run from the repository root::

    python benchmarks/scaling.py                 # 1 and 2 processes on the CPU, ~1 minute
    python benchmarks/scaling.py --procs 1 2 4 --device cuda   # on a machine with 4 GPUs
    python benchmarks/scaling.py --tiny          # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.multiprocessing as mp

from engine import Engine, EngineConfig, OptimizerSpec, RunState
from engine.data.batches import batch_bounds, epoch_order
from engine.distributed.collectives import current_world
from engine.distributed.session import join_process_group, leave_process_group
from examples.models import VAE, AdversarialAE
from strategies import Adversarial, Standard


class StepClock:
    """Wall time from the end of warm-up step ``warmup`` to the end of the run."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.started: float | None = None
        self.stopped: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step == self.warmup:
            self.started = self._now()

    def on_fit_end(self, run: RunState) -> None:
        self.stopped = self._now()

    @property
    def seconds(self) -> float:
        assert self.started is not None and self.stopped is not None
        return self.stopped - self.started


def engine_run(
    workload: str, data: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> float:
    """Seconds for ``args.steps`` engine steps after the warm-up."""
    torch.manual_seed(0)
    if workload == "VAE (Standard)":
        model: torch.nn.Module = VAE(input_shape=(1, 8, 8))
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


def ddp_run(data: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    """The same VAE steps in a hand-written loop over a ``DistributedDataParallel`` model."""
    torch.manual_seed(0)
    model: torch.nn.Module = VAE(input_shape=(1, 8, 8)).to(device)
    world = current_world()
    if world.is_distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
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
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            if step == args.warmup + args.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - started
    raise AssertionError("not enough data for the steps asked")


WORKLOADS: dict[str, Callable[..., float]] = {
    "VAE (Standard)": lambda data, args, device: engine_run("VAE (Standard)", data, args, device),
    "adversarial AE (Adversarial)": lambda data, args, device: engine_run(
        "adversarial AE (Adversarial)", data, args, device
    ),
    "VAE, hand-written DDP loop": ddp_run,
}


def _rank_main(rank: int, nprocs: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(args.threads)
    device = _device(args.device, rank)
    # The engine's own join (nccl on CUDA, gloo otherwise); the DDP loop uses the same group.
    join_process_group(device.type, timeout_s=600.0)
    data = torch.rand(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seconds = {}
    for _ in range(args.repeats):
        for name, run in WORKLOADS.items():
            seconds.setdefault(name, []).append(run(data, args, device))
    if rank == 0:
        torch.save(seconds, Path(out) / f"procs{nprocs}.pt")
    leave_process_group()


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", rank) if name == "cuda" else torch.device(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=300, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--samples", type=int, default=16_384)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a few steps, to check it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.repeats, args.samples = 10, 3, 1, 2048
    if 1 not in args.procs:
        parser.error(f"--procs must include 1 (the baseline), got {args.procs}")
    device = _device(args.device, 0)
    if device.type == "cuda" and max(args.procs) > torch.cuda.device_count():
        parser.error(
            f"--procs {max(args.procs)} on CUDA needs that many GPUs; "
            f"this machine has {torch.cuda.device_count()}"
        )
    print(
        f"device {device.type}, torch {torch.__version__}, {os.cpu_count()} CPU core(s), "
        f"{args.threads} thread(s) per rank, batch {args.batch} per rank, {args.steps} timed "
        f"steps, median of {args.repeats}"
    )
    medians: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as out:
        for nprocs in sorted(set(args.procs)):
            mp.start_processes(
                _rank_main,
                args=(nprocs, _free_port(), args, out),
                nprocs=nprocs,
                start_method="spawn",
            )
            seconds = torch.load(Path(out) / f"procs{nprocs}.pt")
            medians[nprocs] = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    print()
    print(
        "| workload | processes | samples/s (all ranks) | samples/s per process "
        "| scaling efficiency | engine / DDP time |"
    )
    print("|---|---|---|---|---|---|")
    for name in WORKLOADS:
        base = args.steps * args.batch / medians[1][name]
        for nprocs in sorted(medians):
            total = args.steps * args.batch * nprocs / medians[nprocs][name]
            ratio = medians[nprocs][name] / medians[nprocs]["VAE, hand-written DDP loop"]
            versus = f"{ratio:.3f}" if name == "VAE (Standard)" else ""
            print(
                f"| {name} | {nprocs} | {total:,.0f} | {total / nprocs:,.0f} "
                f"| {total / (nprocs * base):.3f} | {versus} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

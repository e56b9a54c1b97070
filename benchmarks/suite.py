"""The benchmark suite: every workload, every trainer, interleaved in one process.

Per workload and batch size, our ``Engine`` (with the workload's strategy) runs against the
floor (a hand-written loop over slices of a pre-shuffled copy, same optimiser implementation),
a hand-written loop with torch's default Adam, a hand-written ``DataLoader`` loop, the engine
with ``compile="step"`` (its whole train step compiled; CUDA graphs on a GPU), and, on the
``Standard`` workloads, pythae, Ignite and Lightning where installed. The compiled engine's
timed epoch is the second of a two-epoch fit; its first epoch (compilation) is reported under
the table, for the first fit of the process and for later fits. Then: cold start, peak RSS of
one run per trainer, and scaling with dataset size. On CUDA, timings use CUDA events at the
edges and the table's memory column is ``torch.cuda.max_memory_allocated``. Run from the
repository root::

    python benchmarks/suite.py            # default run (a few minutes on 2 CPU cores)
    python benchmarks/suite.py --quick    # fewer repeats and samples
    python benchmarks/suite.py --tiny     # seconds: checks that every part runs (no compile)
    python benchmarks/suite.py --no-compile   # without the compiled engine (minutes less)
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import coldstart, dataset_size, memory
from benchmarks.harness import default_clock, device_from, interleave, markdown_table
from benchmarks.peers import available
from benchmarks.workloads import WORKLOADS

PARTS = ("speed", "coldstart", "memory", "scaling")
MEMORY_WORKLOAD = "mlp_vae_1x28x28"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.system()} {cpu}, {torch.get_num_threads()} torch thread(s){gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def speed(args: argparse.Namespace, device: torch.device, peers: list[str]) -> list[str]:
    sections = []
    # Workloads with peers last: importing Lightning, Ignite or pythae slows the engine's Python
    # by a few percent for the rest of the process (measured; cause not found), and the peers
    # are imported when their first workload starts.
    order = sorted(args.workloads, key=lambda name: bool(peers) and WORKLOADS[name].peers)
    for name in order:
        workload = WORKLOADS[name]
        samples = max(256, int(workload.samples * args.scale))
        data = workload.data(samples)
        for batch_size in args.batch_sizes:
            runners = workload.runners(data, batch_size, device, peers, compiled=args.compile)
            timings = interleave(
                runners, batch_size, args.repeats, device, warmup=args.warmup, clock=args.clock
            )
            title = f"{name} ({workload.strategy}), {samples} samples, batch {batch_size}"
            table = markdown_table(title, timings, runners[0].name)
            print(table, "\n", flush=True)
            sections.append(table)
    return sections


def peak_memory(args: argparse.Namespace, peers: list[str]) -> str:
    workload = WORKLOADS[MEMORY_WORKLOAD]
    samples = max(256, int(workload.samples * args.scale))
    names = [r.name for r in workload.runners(workload.data(256), 64, torch.device("cpu"), peers)]
    lines = [
        f"**Peak RSS of one run** ({MEMORY_WORKLOAD}, {samples} samples, batch 64, one epoch, "
        "a fresh process each)",
        "",
        "| trainer | peak RSS MiB |",
        "|---|---:|",
    ]
    for name in names:
        lines.append(f"| {name} | {memory.measure(MEMORY_WORKLOAD, name, 64, samples):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each workload")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="cpu: thread CPU time (the default on CPU with one thread); wall: wall time",
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--no-peers", action="store_true", help="skip pythae, Ignite, Lightning")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help='skip the engine with compile="step" (its first fit compiles for a minute or so)',
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, a quarter of the data")
    parser.add_argument("--tiny", action="store_true", help="a few steps of everything")
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.scale = 3, 0.25
    if args.tiny:
        args.repeats, args.warmup, args.scale, args.batch_sizes = 1, 0, 0.0, [64]
        args.compile = False
    torch.set_num_threads(args.threads)
    device = device_from(args.device)
    if args.clock == "auto":
        args.clock = default_clock(device)
    peers = [] if args.no_peers else available()
    from loguru import logger

    logger.remove()  # the engine's per-fit log lines would drown the tables
    report = [
        f"Machine: {machine()}; device {device}; clock: {args.clock}; "
        f"peers installed: {peers or 'none'}",
        "",
    ]
    print(report[0], flush=True)
    if "speed" in args.parts:
        report += speed(args, device, peers)
    if "coldstart" in args.parts:
        report.append(coldstart.report(coldstart.measure(2 if args.tiny else 5)))
        print(report[-1], "\n", flush=True)
    if "memory" in args.parts and device.type == "cpu":
        report.append(peak_memory(args, peers))
        print(report[-1], "\n", flush=True)
    if "scaling" in args.parts:
        sizes = (1_000, 2_000) if args.tiny else dataset_size.SIZES[: 2 if args.quick else 3]
        report.append(dataset_size.report(dataset_size.measure(sizes)))
        print(report[-1], "\n", flush=True)
    if args.output is not None:
        args.output.write_text("\n\n".join(report) + "\n")
        print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

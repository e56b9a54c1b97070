"""Loop overhead: Engine+Standard against hand-written loops, on a workload where it shows.

An MLP VAE on 1x4x4 inputs (20,000 samples, batch 64 and 256, one thread): the model is so small
that whatever a trainer does per step besides forward, backward and the optimiser step shows up
in the time. All trainers run in one process, interleaved. ``--compile model step`` adds the
engine with each ``EngineConfig.compile`` mode (timed on the second epoch of a two-epoch fit,
compilation reported apart); ``--workload mlp_vae_1x28x28`` takes that suite workload's model
instead. Run from the repository root::

    python benchmarks/overhead.py            # full run (about a minute)
    python benchmarks/overhead.py --compile model step --batch-sizes 64
    python benchmarks/overhead.py --tiny     # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.harness import (
    default_clock,
    device_from,
    interleave,
    markdown_table,
    paired_ratio,
)
from benchmarks.loops import standard_runners
from benchmarks.workloads import WORKLOADS

FLOOR = "floor: sliced loop, fused Adam"
ENGINE = "engine + Standard (fused Adam)"
PLAIN = "plain loop: sliced, default Adam"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="default: the workload's")
    parser.add_argument(
        "--workload",
        default="mlp_vae_1x4x4",
        choices=[name for name, w in WORKLOADS.items() if w.strategy == "Standard"],
    )
    parser.add_argument("--compile", nargs="*", default=[], choices=["model", "step"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="cpu: thread CPU time (the default on CPU with one thread); wall: wall time",
    )
    parser.add_argument("--tiny", action="store_true", help="a few steps, to check it runs")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    if args.tiny:
        args.samples, args.repeats, args.batch_sizes, args.compile = 512, 2, [64], []
    args.samples = args.samples or workload.samples
    torch.set_num_threads(args.threads)
    device = device_from(args.device)
    data = workload.data(args.samples)
    clock = default_clock(device) if args.clock == "auto" else args.clock
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"clock: {clock}"
    )
    for batch_size in args.batch_sizes:
        runners = standard_runners(workload.make_model, data, batch_size, device)
        runners += [workload.compiled_runner(data, batch_size, device, m) for m in args.compile]
        timings = interleave(runners, batch_size, args.repeats, device, clock=clock)
        title = (
            f"{args.workload}, {args.samples} samples, batch {batch_size}, {args.repeats} repeats"
        )
        print()
        print(markdown_table(title, timings, FLOOR))
        by = {t.name: t for t in timings}
        print(
            f"\nengine / floor (same fused Adam): {paired_ratio(by[ENGINE], by[FLOOR]):.3f} "
            f"paired median, {by[ENGINE].low / by[FLOOR].low:.3f} min (target <= 1.03); "
            f"engine / plain loop (default Adam): {paired_ratio(by[ENGINE], by[PLAIN]):.3f} "
            f"paired median, {by[ENGINE].low / by[PLAIN].low:.3f} min (target < 1.0)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

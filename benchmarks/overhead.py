"""Loop overhead: Engine+Standard against hand-written loops, on a workload where it shows.

An MLP VAE on 1x4x4 inputs (20,000 samples, batch 64 and 256, one thread): the model is so small
that whatever a trainer does per step besides forward, backward and the optimiser step shows up
in the time. All trainers run in one process, interleaved. Run from the repository root::

    python benchmarks/overhead.py            # full run (about a minute)
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
from examples.models import VAE

FLOOR = "floor: sliced loop, fused Adam"
ENGINE = "engine + Standard (fused Adam)"
PLAIN = "plain loop: sliced, default Adam"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
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
    if args.tiny:
        args.samples, args.repeats, args.batch_sizes = 512, 2, [64]
    torch.set_num_threads(args.threads)
    device = device_from(args.device)
    data = torch.rand(args.samples, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    clock = default_clock(device) if args.clock == "auto" else args.clock
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"clock: {clock}"
    )
    for batch_size in args.batch_sizes:
        runners = standard_runners(lambda: VAE(input_shape=(1, 4, 4)), data, batch_size, device)
        timings = interleave(runners, batch_size, args.repeats, device, clock=clock)
        title = f"MLP VAE 1x4x4, {args.samples} samples, batch {batch_size}, {args.repeats} repeats"
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

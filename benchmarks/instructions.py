"""The engine's overhead over the hand-written floor, counted in CPU instructions, not timed.

On a shared machine a few microseconds per step are below the noise of any clock (the suite's
ratios move by +-3% between runs here, 30-40 us on a 1 ms step). Instructions retired are
nearly deterministic: this script runs each trainer of a workload under valgrind's callgrind,
with counting switched on only around one whole one-epoch run (after a first run that warms
imports and caches), for two epoch lengths. The difference between the two lengths, divided by
the number of extra steps, is the per-step count; what is left is the per-fit (fixed) count.
The engine's overhead is then ``engine - floor`` per step and per fit; its share of the
floor's step gives an estimate in microseconds at the floor's measured speed (an estimate: it
assumes the extra instructions run at the floor's rate).

Counts are nearly, not exactly, deterministic: glibc's allocator and the addresses it hands
out differ between runs, and with them the work of the allocator and of a few kernels. The
same code counted twice here differed by up to about 10k instructions per step; the children
run with a fixed string hash (``PYTHONHASHSEED=0``), which removes the dictionaries' share.

Needs valgrind (``apt-get install valgrind``); each trainer run takes a minute or two under it.
Run from the repository root::

    python benchmarks/instructions.py                        # the four 1x4x4 workloads
    python benchmarks/instructions.py --workloads mlp_vae_1x4x4 --steps 20 120
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKLOADS = ("mlp_vae_1x4x4", "adversarial_ae_1x4x4", "rae_l2_1x4x4", "vaegan_1x4x4")
TRAINERS = ("floor", "engine")
BATCH = 64


def one_run(
    workload: str, trainer: str, steps: int, count: Callable[[bool], None] | None = None
) -> None:
    """In the child process under callgrind: warm up, then count one epoch of ``steps``
    (``count(True)``/``count(False)`` switch counting; callgrind's by default)."""
    count = count or _count
    import torch
    from loguru import logger

    from benchmarks.grouped import grouped_runners
    from benchmarks.loops import standard_runners
    from benchmarks.workloads import WORKLOADS as ALL

    torch.set_num_threads(1)
    logger.remove()
    chosen = ALL[workload]
    data = chosen.data(BATCH * steps)
    device = torch.device("cpu")
    if chosen.strategy == "Standard":
        runners = standard_runners(chosen.make_model, data, BATCH, device)
    else:
        runners = grouped_runners(chosen.strategy, chosen.make_model, data, BATCH, device)
    epoch = runners[TRAINERS.index(trainer)].prepare()  # the floor first, then the engine
    epoch()  # warm: imports, caches, first-use allocations
    count(True)
    epoch()
    count(False)


def _count(on: bool) -> None:
    """Switch callgrind's counting on or off for this process (and wait until it is)."""
    state = "on" if on else "off"
    subprocess.run(
        ["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True
    )


def counted(workload: str, trainer: str, steps: int) -> int:
    """Instructions of one epoch of ``steps`` steps of ``trainer`` on ``workload``."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable, str(Path(__file__).resolve()), "--child", workload, trainer,
            str(steps),
        ]  # fmt: skip
        # A fixed string hash: dict and set layouts (and so their lookups) the same in every run.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(command, check=True, capture_output=True, env=env)
        for line in out.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no total for {workload} {trainer} {steps}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 120], metavar=("SHORT", "LONG"))
    parser.add_argument(
        "--floor-ms",
        type=float,
        nargs="*",
        default=[],
        help="the floor's ms/step per workload (from suite.py), for the us estimate",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        workload, trainer, steps = args.child
        one_run(workload, trainer, int(steps))
        return 0
    short, long = args.steps
    if not 0 < short < long:
        parser.error(f"--steps needs 0 < SHORT < LONG, got {short} {long}")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    print(
        "| workload | floor instr/step | engine - floor per step | share of the floor's step "
        "| engine - floor per fit | est. us/step over |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for index, workload in enumerate(args.workloads):
        per_step, fixed = {}, {}
        for trainer in TRAINERS:
            low, high = counted(workload, trainer, short), counted(workload, trainer, long)
            per_step[trainer] = (high - low) / (long - short)
            fixed[trainer] = low - per_step[trainer] * short
        over = per_step["engine"] - per_step["floor"]
        share = over / per_step["floor"]
        estimate = ""
        if index < len(args.floor_ms):
            estimate = f"{share * args.floor_ms[index] * 1000:.1f}"
        print(
            f"| {workload} | {per_step['floor']:,.0f} | {over:+,.0f} | {share:+.2%} "
            f"| {fixed['engine'] - fixed['floor']:+,.0f} | {estimate} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run every 2-process test path many times and count the runs that fail (an abort at exit
included): ``python -m tests.engine.repeat_two_ranks --runs 100 [--paths NAME ...]``.

A path is what one 2-process test does, called directly (no pytest per run): the spawned
scenarios of ``tests/distributed_worker.py`` (training, hung), the real ``torchrun`` launch,
the resume test of ``tests/engine/test_checkpoint_ranks.py``, the flag test of
``tests/strategies/test_flags_across_ranks.py`` and ``benchmarks/scaling.py --tiny``. A run
fails when a process exits with an error or a signal (``terminate called without an active
exception`` is a SIGABRT) or its results are missing. Prints one line per run and a summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _training(folder: Path) -> None:
    from tests import distributed_worker as worker

    worker.spawn("training", folder, deadline_s=600)


def _hung(folder: Path) -> None:
    from tests import distributed_worker as worker

    worker.spawn("hung", folder, deadline_s=600)


def _torchrun(folder: Path) -> None:
    from tests.helpers import free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={free_port()}", "-m", "tests.distributed_worker", "torchrun",
        str(folder),
    ]  # fmt: skip
    _subprocess(command)


def _checkpoint_ranks(folder: Path) -> None:
    from tests.engine import test_checkpoint_ranks as test
    from tests.helpers import free_port

    test._fit(folder, "one-process", 3, None, seed=0, batch_size=2 * test.WORLD_SIZE)
    mp.start_processes(
        test._entry, args=(free_port(), str(folder)), nprocs=2, start_method="spawn", join=True
    )


def _flags(folder: Path) -> None:
    from tests.helpers import free_port
    from tests.strategies import test_flags_across_ranks as test

    mp.start_processes(
        test._rank, args=(free_port(), str(folder)), nprocs=2, start_method="spawn", join=True
    )


def _scaling(folder: Path) -> None:
    _subprocess([sys.executable, "benchmarks/scaling.py", "--tiny"])


def _subprocess(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or "terminate called" in done.stderr:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-1500:]}")


PATHS: dict[str, Callable[[Path], None]] = {
    "training": _training,
    "torchrun": _torchrun,
    "hung": _hung,
    "checkpoint_ranks": _checkpoint_ranks,
    "flags": _flags,
    "scaling": _scaling,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    args = parser.parse_args(argv)
    failures: dict[str, list[str]] = {name: [] for name in args.paths}
    for name in args.paths:
        started = time.monotonic()
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"two-ranks-{name}-") as folder:
                try:
                    PATHS[name](Path(folder))
                    status = "ok"
                except BaseException as error:  # an abort surfaces as ProcessExitedException
                    if isinstance(error, KeyboardInterrupt):
                        raise
                    text = "".join(traceback.format_exception_only(type(error), error)).strip()
                    failures[name].append(f"run {run}: {text[-1500:]}")
                    status = f"FAILED {text[-300:]}"
            print(f"{name} {run + 1}/{args.runs} {status}", flush=True)
        seconds = time.monotonic() - started
        print(f"== {name}: {len(failures[name])} failed of {args.runs} ({seconds:.0f} s)")
    print("\n| path | runs | failed |\n|---|---:|---:|")
    for name in args.paths:
        print(f"| {name} | {args.runs} | {len(failures[name])} |")
    for name, found in failures.items():
        for line in found:
            print(f"{name} {line}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

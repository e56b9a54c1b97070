"""Peak resident memory of one trainer's run, measured in a fresh child process.

RSS only grows within a process, so each trainer runs alone: the child builds the workload,
trains one epoch with the named runner, and prints its peak RSS (``ru_maxrss``) in MiB. Run
from the repository root: ``python benchmarks/memory.py mlp_vae_1x28x28 "engine + Standard
(fused Adam)" 64``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.harness import device_from

SCRIPT = Path(__file__).resolve()


def peak_rss_mib() -> float:
    """This process's peak resident set size so far.

    On Linux it is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would not do, since a child
    started by ``subprocess`` inherits its parent's peak at the fork. Elsewhere ``ru_maxrss``
    (macOS reports bytes, the others KiB).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure(
    workload: str, runner: str, batch_size: int, samples: int | None = None, device: str = "cpu"
) -> float:
    """Peak RSS (MiB) of a child process that trains one epoch of ``runner`` on ``workload``."""
    command = [sys.executable, str(SCRIPT), workload, runner, str(batch_size), device]
    if samples is not None:
        command.append(str(samples))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {runner!r} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    from loguru import logger

    from benchmarks.peers import available
    from benchmarks.workloads import WORKLOADS

    logger.remove()
    if len(argv) < 3:
        raise SystemExit("usage: memory.py WORKLOAD RUNNER BATCH_SIZE [DEVICE [SAMPLES]]")
    workload_name, runner_name, batch_size = argv[:3]
    device_name = argv[3] if len(argv) > 3 else "cpu"
    workload = WORKLOADS[workload_name]
    data = workload.data(int(argv[4]) if len(argv) > 4 else None)
    torch.set_num_threads(1)
    device = device_from(device_name)
    peers = [peer for peer in available() if peer in runner_name.lower()]  # only the one named
    runners = workload.runners(data, int(batch_size), device, peers)
    chosen = {runner.name: runner for runner in runners}
    if runner_name not in chosen:
        raise SystemExit(f"unknown runner {runner_name!r}; choose from {sorted(chosen)}")
    chosen[runner_name].prepare()()
    print(f"{peak_rss_mib():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

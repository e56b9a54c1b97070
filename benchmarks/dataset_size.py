"""Scaling with dataset size: time per epoch and peak memory at 10k, 100k and 1M samples.

The 1x4x4 MLP VAE workload, batch 256, one epoch per size, with ``Engine`` + ``Standard`` on
two data paths: in-memory tensors (the fast path: a shuffled copy, then slices) and a map-style
dataset read through a ``DataLoader`` (per-sample indexing and collation). The map-style dataset
serves samples from a fixed bank of 1,024, as a disk-backed dataset would, so its memory should
not grow with its length. Each (path, size) runs in a fresh child process so its peak RSS is
its own; a two-step warm-up run in the child takes the lazy imports out of the timing.
Run from the repository root: ``python benchmarks/dataset_size.py [--quick]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs
import torch
from torch.utils.data import Dataset

SCRIPT = Path(__file__).resolve()
SIZES = (10_000, 100_000, 1_000_000)
PATHS = ("tensors", "dataset")


class BankDataset(Dataset[dict[str, torch.Tensor]]):
    """``length`` samples served from a bank of 1,024: memory independent of the length."""

    def __init__(self, length: int, shape: tuple[int, ...] = (1, 4, 4)) -> None:
        self.length = length
        self.bank = torch.rand((1024, *shape), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"data": self.bank[index % 1024]}


def run_child(path: str, samples: int, batch_size: int) -> tuple[float, float]:
    """Train one epoch in this process; (CPU seconds of ``fit`` in this thread, where all its
    work runs with one torch thread and no loader workers; peak RSS MiB)."""
    from loguru import logger

    from benchmarks.memory import peak_rss_mib
    from engine import Engine, EngineConfig, OptimizerSpec
    from examples.models import VAE
    from strategies import Standard

    logger.remove()
    torch.set_num_threads(1)
    data: Any
    if path == "tensors":
        data = {"data": torch.rand(samples, 1, 4, 4, generator=torch.Generator().manual_seed(0))}
    else:
        data = BankDataset(samples)
    config = EngineConfig(epochs=1, batch_size=batch_size, output_dir=None, device="cpu")
    warmup = Engine(Standard(OptimizerSpec("Adam", lr=1e-3)), attrs.evolve(config, max_steps=2))
    warmup.fit(VAE(input_shape=(1, 4, 4)), BankDataset(4 * batch_size))  # lazy imports, kernels
    torch.manual_seed(0)
    engine = Engine(Standard(OptimizerSpec("Adam", lr=1e-3)), config)
    started = time.thread_time()
    engine.fit(VAE(input_shape=(1, 4, 4)), data)
    return time.thread_time() - started, peak_rss_mib()


def measure(sizes: tuple[int, ...], batch_size: int = 256) -> list[tuple[str, int, float, float]]:
    """(path, samples, seconds per epoch, peak RSS MiB) per path and size, one child each."""
    rows = []
    for samples in sizes:
        for path in PATHS:
            command = [sys.executable, str(SCRIPT), "--child", path, str(samples), str(batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"dataset_size child {path} {samples} failed:\n{done.stderr}")
            seconds, rss = (float(v) for v in done.stdout.split())
            rows.append((path, samples, seconds, rss))
    return rows


def report(rows: list[tuple[str, int, float, float]]) -> str:
    lines = [
        "**Dataset size** (MLP VAE 1x4x4, batch 256, one epoch, Engine + Standard)",
        "",
        "| data path | samples | CPU s/epoch | us/sample | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for path, samples, seconds, rss in rows:
        label = "tensors (fast path)" if path == "tensors" else "map-style Dataset (DataLoader)"
        lines.append(
            f"| {label} | {samples:,} | {seconds:.2f} | {seconds / samples * 1e6:.2f} | {rss:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k samples only")
    parser.add_argument("--tiny", action="store_true", help="1k and 2k samples: checks it runs")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "SAMPLES", "BATCH"))
    args = parser.parse_args(argv)
    if args.child:
        seconds, rss = run_child(args.child[0], int(args.child[1]), int(args.child[2]))
        print(f"{seconds} {rss}")
        return 0
    sizes = (1_000, 2_000) if args.tiny else SIZES[:2] if args.quick else SIZES
    print(report(measure(sizes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

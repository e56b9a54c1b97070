"""Checkpoint save time and size for the reference VAE, against the bare write of its state.

The reference VAE (examples/models.py, 1x8x8 digits, hidden 128, latent 8) trains with
``Checkpointing(every_n_steps=N)``. Two probe handlers, subscribed just before and just after
``CHECKPOINT_PRIORITY`` at BATCH_END, time how long each save stalls training. In the same
folder, interleaved with the run, the baseline is "the write itself": one ``torch.save`` of the
same model and optimiser state into a file, fsynced and renamed. The table gives the median
milliseconds of both, their ratio, and the bytes on disk. Run from the repository root::

    python benchmarks/checkpoint_save.py            # about a minute
    python benchmarks/checkpoint_save.py --tiny     # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger

from callbacks import Checkpointing
from engine import CHECKPOINT_PRIORITY, Engine, EngineConfig, Event, OptimizerSpec, RunState
from engine.checkpoint import MARKER
from examples.models import VAE
from strategies import Standard


def _digits() -> dict[str, torch.Tensor]:
    try:
        from examples.data import digits

        return digits("train")
    except ImportError:  # scikit-learn is the examples extra; noise of the same shape otherwise
        from examples.data import noise

        return noise(1527, (1, 8, 8))


def bare_write(folder: Path, state: dict[str, object]) -> float:
    """Seconds for torch.save + fsync + rename of ``state`` in ``folder`` (the write itself)."""
    started = time.perf_counter()
    temporary = folder / ".bare.tmp"
    with temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / "bare.pt")
    return time.perf_counter() - started


class SaveProbe:
    """Times the Checkpointing handlers of each save step, and after each, the bare write."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.stalls: list[float] = []
        self.writes: list[float] = []
        self._started = 0.0

    def before(self, run: RunState) -> None:
        self._started = time.perf_counter()

    def after(self, run: RunState) -> None:
        if run.progress.step % self.every != 0:
            return
        self.stalls.append(time.perf_counter() - self._started)
        optimizer = run.strategy.state_dict()
        state = {"model": run.model.state_dict(), "strategy": optimizer}
        assert run.run_dir is not None
        self.writes.append(bare_write(run.run_dir, state))


def measure(steps: int, every: int, durable: bool, folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    probe = SaveProbe(every)
    checkpointing = Checkpointing(
        every_n_epochs=None, every_n_steps=every, keep_periodic=0, best_k=0, durable=durable
    )
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-3)),
        EngineConfig(
            epochs=1000,
            max_steps=steps,
            batch_size=64,
            device="cpu",
            output_dir=folder,
            log_every=every,
        ),
        [checkpointing],
    )
    engine.on(Event.BATCH_END, probe.before, priority=CHECKPOINT_PRIORITY + 1)
    engine.on(Event.BATCH_END, probe.after, priority=CHECKPOINT_PRIORITY - 1)
    started = time.perf_counter()
    result = engine.fit(VAE(), _digits())
    seconds = time.perf_counter() - started
    assert result.run_dir is not None
    last = result.run_dir / "checkpoints" / "last"
    size = sum(path.stat().st_size for path in last.iterdir() if path.name != MARKER)
    stall, write = statistics.median(probe.stalls), statistics.median(probe.writes)
    return {
        "saves": len(probe.stalls),
        "stall_ms": stall * 1e3,
        "write_ms": write * 1e3,
        "ratio": stall / write,
        "bytes": size,
        "model_bytes": (last / "model.pt").stat().st_size,
        "bare_bytes": (result.run_dir / "bare.pt").stat().st_size,
        "step_ms": seconds * 1e3 / steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a few saves, to check it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.every = 12, 3
    logger.remove()
    torch.set_num_threads(1)
    print(
        "| fsync | saves | save stall ms | bare write ms | stall / write | checkpoint bytes "
        "| model.pt bytes | bare torch.save bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for durable in (True, False):
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
            row = measure(args.steps, args.every, durable, Path(folder))
        print(
            f"| {'yes' if durable else 'no'} | {row['saves']:.0f} | {row['stall_ms']:.2f} | "
            f"{row['write_ms']:.2f} | {row['ratio']:.2f} | {row['bytes']:,.0f} | "
            f"{row['model_bytes']:,.0f} | {row['bare_bytes']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checkpoint save time and size for the reference VAE, against the bare write of its state.

The reference VAE (examples/models.py, 1x8x8 digits, hidden 128, latent 8) trains with
``Checkpointing(every_n_steps=N)``. Two probe handlers, subscribed just before and just after
``CHECKPOINT_PRIORITY`` at BATCH_END, time how long each save stalls training. The baseline is
"the write itself": one ``torch.save`` of the same model and optimiser state into a file of the
same folder, fsynced and renamed, timed after the run (nothing else writing). Medians, one
torch thread, repeats interleaved. Run from the repository root::

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
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger

from callbacks import Checkpointing
from engine import (
    CHECKPOINT_PRIORITY,
    Engine,
    EngineConfig,
    Event,
    OptimizerSpec,
    RunState,
    Subscription,
)
from engine.checkpoint.format import MARKER
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
    """Times the Checkpointing handlers of each save step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.stalls: list[float] = []
        self._started = 0.0

    def before(self, run: RunState) -> None:
        self._started = time.perf_counter()

    def after(self, run: RunState) -> None:
        if run.progress.step % self.every == 0:
            self.stalls.append(time.perf_counter() - self._started)


def train(steps: int, every: int, folder: Path, callbacks: list[Any]) -> tuple[float, Engine, Any]:
    """Seconds of a fit of ``steps`` steps, its engine and its result."""
    torch.manual_seed(0)
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
        callbacks,
    )
    started = time.perf_counter()
    result = engine.fit(VAE(), _digits())
    return time.perf_counter() - started, engine, result


MODES = ((True, True), (True, False), (False, True), (False, False))  # (fsync, background)


def measure(
    steps: int, every: int, durable: bool, background: bool, folder: Path
) -> dict[str, Any]:
    """One checkpointed run: its seconds, each save's stall, bare writes of its state, sizes."""
    probe = SaveProbe(every)
    checkpointing = Checkpointing(
        every_n_epochs=None,
        every_n_steps=every,
        keep_periodic=0,
        best_k=0,
        durable=durable,
        background=background,
        export=False,  # the plain weight exports are not checkpoint saves
    )
    probes = [
        Subscription(Event.BATCH_END, probe.before, priority=CHECKPOINT_PRIORITY + 1),
        Subscription(Event.BATCH_END, probe.after, priority=CHECKPOINT_PRIORITY - 1),
    ]
    seconds, engine, result = train(steps, every, folder, [checkpointing, *probes])
    assert result.run_dir is not None
    last = result.run_dir / "checkpoints" / "last"
    weights = torch.load(last / "model.pt", weights_only=True)
    state = {"model": weights, "strategy": engine.strategy.state_dict()}
    writes = [bare_write(result.run_dir, state) for _ in range(max(5, len(probe.stalls)))]
    return {
        "seconds": seconds,
        "stalls": probe.stalls,
        "writes": writes,
        "bytes": sum(path.stat().st_size for path in last.iterdir() if path.name != MARKER),
        "model_bytes": (last / "model.pt").stat().st_size,
        "bare_bytes": (result.run_dir / "bare.pt").stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a few saves, to check it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.every, args.repeats = 12, 3, 1
    logger.remove()
    torch.set_num_threads(1)
    rows: dict[tuple[bool, bool], list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        train(2, 1, Path(folder), [Checkpointing(every_n_steps=1)])  # warm up: imports
        for _ in range(args.repeats):  # interleaved, so machine noise hits every mode alike
            for mode in MODES:
                rows[mode].append(measure(args.steps, args.every, *mode, Path(folder)))
    print(
        f"{args.steps} steps, a save every {args.every}, {args.repeats} interleaved repeats "
        "(medians)\n"
    )
    print(
        "| fsync | background | save stall ms | bare write ms | stall / write "
        "| checkpoint bytes | model.pt bytes | bare torch.save bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        stall = statistics.median(s for row in rows[mode] for s in row["stalls"])
        write = statistics.median(w for row in rows[mode] for w in row["writes"])
        last = rows[mode][-1]
        print(
            f"| {'yes' if mode[0] else 'no'} | {'yes' if mode[1] else 'no'} | "
            f"{stall * 1e3:.2f} | {write * 1e3:.2f} | {stall / write:.2f} | "
            f"{last['bytes']:,} | "
            f"{last['model_bytes']:,} | {last['bare_bytes']:,} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A long CPU run slows down as Adam's state decays into denormal floats; flushing them does not.

Adam keeps a running mean of each parameter's squared gradient (``exp_avg_sq``, decay 0.999).
Where gradients are tiny, those values shrink below 1.2e-38 after some thousands of steps:
denormal floats, on which x86 arithmetic is many times slower. The fused Adam kernel then
slows every step. ``torch.set_flush_denormal(True)`` (flush to zero) keeps the kernel at full
speed; it changes only values below 1.2e-38, which it sets to 0.

Each setting runs in a process of its own (the setting is process-wide), both at once: every
epoch's CPU seconds (the training thread's) of one ``Engine.fit`` of the MLP VAE 1x4x4 (20,000
samples, batch 64, fused Adam, one thread). Run from the repository root::

    python benchmarks/denormals.py             # 15 epochs (about 10 s)
    python benchmarks/denormals.py --tiny      # 2 epochs of 640 samples: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one_run(flush: bool, epochs: int, samples: int) -> list[float]:
    """Each epoch's CPU seconds (this thread's, from EPOCH_START to EPOCH_END: the two runs
    share the cores) with flushing on or off."""
    import time

    import torch
    from loguru import logger

    from engine import Engine, EngineConfig, Event, OptimizerSpec
    from examples.models import VAE
    from strategies import Standard

    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    logger.remove()
    config = EngineConfig(epochs=epochs, batch_size=64, output_dir=None)
    engine = Engine(Standard(OptimizerSpec("Adam", lr=1e-3)), config)
    data = torch.rand(samples, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    starts: list[float] = []
    seconds: list[float] = []
    engine.on(Event.EPOCH_START, lambda run: starts.append(time.thread_time()))
    engine.on(Event.EPOCH_END, lambda run: seconds.append(time.thread_time() - starts[-1]))
    engine.fit(VAE(input_shape=(1, 4, 4)), {"data": data})
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--tiny", action="store_true", help="2 epochs of 640 samples")
    parser.add_argument("--child", choices=["flush", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs, samples = (2, 640) if args.tiny else (args.epochs, args.samples)
    if args.epochs < 1 or args.samples < 64:
        parser.error(f"--epochs must be >= 1 and --samples >= 64, got {epochs} and {samples}")
    if args.child:
        print(json.dumps(one_run(args.child == "flush", epochs, samples)))
        return 0
    script = str(Path(__file__).resolve())
    sizes = ["--epochs", str(epochs), "--samples", str(samples)]
    children = {
        name: subprocess.Popen(
            [sys.executable, script, "--child", name, *sizes], stdout=subprocess.PIPE, text=True
        )
        for name in ("keep", "flush")
    }
    seconds = {}
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"the {name} run failed (exit {child.returncode})")
        seconds[name] = json.loads(out.strip().splitlines()[-1])
    print("| epoch | denormals kept (torch's default), CPU s | flushed to zero, CPU s |")
    print("|---:|---:|---:|")
    for epoch, (keep, flush) in enumerate(zip(seconds["keep"], seconds["flush"])):
        print(f"| {epoch} | {keep:.3f} | {flush:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

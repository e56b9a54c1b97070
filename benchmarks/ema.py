"""What an EMA of the weights costs per training step, on the reference conv GAN.

The reference is the DCGAN of ``examples/configs/dcgan_digits.toml`` (28x28 digits, latent 32,
width 32; 176k parameters, 140k of them in the generator) trained by ``Adversarial(two_phase=True)``
with ``Engine.fit``, one epoch per timed run, batch 32. Runners, interleaved (see
``benchmarks/harness.py``): no EMA; ``EMA(module="generator")``; ``EMA()`` of the whole model.
The table gives ms/step and the ratio to the run without EMA (median of per-round ratios);
below it, the update alone: microseconds per ``EMA.update`` (one ``torch._foreach_lerp_`` over
the parameters and one ``_foreach_copy_`` of the buffers), timed over many calls, and what it
adds to the step without EMA: the direct cost, which a busy machine's noise in the whole-step
ratio can hide. Goal: at most 1.02x. Run from the repository root::

    python benchmarks/ema.py              # about a minute on one CPU thread
    python benchmarks/ema.py --tiny       # seconds: checks that it runs
    python benchmarks/ema.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger

from benchmarks.harness import EpochFn, Runner, device_from, interleave, markdown_table
from callbacks.ema import EMA
from engine import Engine, EngineConfig, OptimizerSpec
from examples.gan_models import DCGAN
from strategies import Adversarial

BASE = "no EMA"


def _digits(size: int, count: int | None) -> torch.Tensor:
    try:
        from examples.gan_data import digits_images

        data = digits_images("train", size)["data"]
    except ImportError:  # scikit-learn is the examples extra; noise of the same shape otherwise
        data = torch.rand(1527, 1, size, size, generator=torch.Generator().manual_seed(0))
    return data if count is None else data[:count]


def _strategy() -> Adversarial:
    adam = OptimizerSpec("Adam", lr=2e-4, betas=(0.5, 0.99))
    return Adversarial(
        generator=adam, discriminator=adam, two_phase=True, generator_loss_key="generator_loss"
    )


def _runner(
    name: str,
    template: torch.nn.Module,
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
    ema: dict[str, Any] | None,
) -> Runner:
    def prepare() -> EpochFn:
        model = _copy(template, device)
        callbacks = [] if ema is None else [EMA(**ema)]
        config = EngineConfig(
            epochs=1, batch_size=batch_size, device=str(device), output_dir=None, log_every=10**6
        )
        engine = Engine(_strategy(), config, callbacks)
        on_device = {"data": data.to(device)}

        def epoch() -> int:
            return engine.fit(model, on_device).steps

        return epoch

    return Runner(name, prepare)


def _copy(template: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = DCGAN(**template.config)  # type: ignore[arg-type]
    model.load_state_dict(template.state_dict())
    return model.to(device)


def update_microseconds(
    template: torch.nn.Module, device: torch.device, module: str | None, calls: int
) -> float:
    """Median over 5 rounds of the time of one ``EMA.update``, in microseconds."""
    model = _copy(template, device)
    ema = EMA(module=module, half_life=2000.0, rampup=0.05)
    ema.attach(model)
    rounds = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            ema.update(32)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return sorted(rounds)[2]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = device_from(args.device)
    batch_size = 32
    data = _digits(28, 96 if args.tiny else None)
    repeats = 1 if args.tiny else args.repeats
    torch.manual_seed(0)
    template = DCGAN(image_size=28, latent_dim=32, width=32)
    runners = [
        _runner(BASE, template, data, batch_size, device, None),
        _runner("EMA(generator)", template, data, batch_size, device, {"module": "generator"}),
        _runner("EMA(whole model)", template, data, batch_size, device, {}),
    ]
    timings = interleave(runners, batch_size, repeats, device, warmup=0 if args.tiny else 1)
    calls = 10 if args.tiny else 500
    params = {
        "generator": sum(p.numel() for p in template.generator.parameters()),
        "whole model": sum(p.numel() for p in template.parameters()),
    }
    lines = [
        markdown_table(
            f"EMA on the reference DCGAN (28x28, batch {batch_size}, {device}, "
            f"{torch.get_num_threads()} thread(s))",
            timings,
            BASE,
        ),
        "",
        "| EMA.update alone | parameters | us/update | step + update, x step |",
        "|---|---:|---:|---:|",
    ]
    step_us = timings[0].median * 1000.0
    for label, module in (("generator", "generator"), ("whole model", None)):
        micro = update_microseconds(template, device, module, calls)
        ratio = (step_us + micro) / step_us
        lines.append(f"| {label} | {params[label]:,} | {micro:.1f} | {ratio:.4f} |")
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    logger.remove()  # the engine's per-fit log lines would swamp the table
    main()

"""What an R1 penalty costs per training step: lazy (every 16 steps) against every step.

The model is the reference conv GAN of ``examples/configs/dcgan_digits.toml`` (28x28 digits,
latent 32, width 32; its discriminator: two stride-2 convolutions and a linear layer), trained by
the sequential ``Adversarial(two_phase=True)`` with ``Engine.fit``, one epoch (48 steps, a
multiple of 16) per timed run, batch 32. Runners, interleaved (``benchmarks/harness.py``): no
regulariser; ``r1(gamma)`` in a lazy phase every 16 windows (penalty times 16, Adam corrected,
StyleGAN2's default); ``r1(gamma)`` in every discriminator phase. The discriminator's forward is
the same in all three (its real images require grad), so the difference is the penalty's double
backward and, for the lazy phase, its own forward and step. Goal (issue 13): the lazy R1 at most
1.15x the unregularised step. Run from the repository root::

    python benchmarks/regularisers.py              # about a minute on one CPU thread
    python benchmarks/regularisers.py --tiny       # seconds: checks that it runs
    python benchmarks/regularisers.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger

from benchmarks.harness import (
    EpochFn,
    Runner,
    default_clock,
    device_from,
    interleave,
    markdown_table,
    paired_ratio,
)
from engine import Engine, EngineConfig, OptimizerSpec
from examples.gan_models import DCGAN
from strategies import Adversarial, r1

BASE = "no regulariser"
LAZY = "R1 every 16 steps (lazy)"
EVERY = "R1 every step"


def _strategy(regularise: dict[str, Any]) -> Adversarial:
    adam = OptimizerSpec("Adam", lr=2e-4, betas=(0.5, 0.99))
    return Adversarial(
        generator=adam,
        discriminator=adam,
        two_phase=True,
        generator_loss_key="generator_loss",
        **regularise,
    )


def _runner(
    name: str,
    template: DCGAN,
    data: torch.Tensor,
    device: torch.device,
    regularise: dict[str, Any],
) -> Runner:
    def prepare() -> EpochFn:
        model = DCGAN(**template.config)  # type: ignore[arg-type]
        model.load_state_dict(template.state_dict())
        model.to(device)
        config = EngineConfig(
            epochs=1, batch_size=32, device=str(device), output_dir=None, log_every=10**6
        )
        engine = Engine(_strategy(regularise), config)
        on_device = {"data": data.to(device)}

        def epoch() -> int:
            return engine.fit(model, on_device).steps

        return epoch

    return Runner(name, prepare)


def _digits(count: int) -> torch.Tensor:
    try:
        from examples.gan_data import digits_images

        data = digits_images("train", 28)["data"]
    except ImportError:  # scikit-learn is the examples extra; noise of the same shape otherwise
        data = torch.rand(1536, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return data[:count]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--gamma", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = device_from(args.device)
    data = _digits(32 * (16 if args.tiny else 48))
    repeats = 1 if args.tiny else args.repeats
    torch.manual_seed(0)
    template = DCGAN(image_size=28, latent_dim=32, width=32)
    penalty = (r1(args.gamma),)
    runners = [
        _runner(BASE, template, data, device, {}),
        _runner(LAZY, template, data, device, {"regularisers": penalty, "regularise_every": 16}),
        _runner(EVERY, template, data, device, {"regularisers": penalty}),
    ]
    timings = interleave(runners, 32, repeats, device, warmup=0 if args.tiny else 1)
    base = next(t for t in timings if t.name == BASE)
    title = (
        f"R1 on the reference DCGAN's discriminator (28x28, batch 32, {device}, "
        f"{torch.get_num_threads()} thread(s), clock: {default_clock(device)})"
    )
    lines = [markdown_table(title, timings, BASE), ""]
    for timing in timings:
        lines.append(
            f"- {timing.name}: {timing.median * 1000:,.0f} us/step, "
            f"{paired_ratio(timing, base):.3f}x the unregularised step"
        )
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    logger.remove()  # the engine's per-fit log lines would drown the table
    main()

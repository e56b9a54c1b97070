"""Train a multi-optimiser reference model on scikit-learn's digits and print its losses.

``python examples/demo_multi.py aae|rae|vaegan|wgan [--epochs N]``: the adversarial
autoencoder with ``Adversarial``, RAE-L2 with ``Coupled``, VAEGAN with ``CoupledAdversarial``,
and a WGAN-GP with two-phase ``Adversarial`` (five critic updates per generator update).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks import ConsoleMetrics
from engine import Engine, EngineConfig, OptimizerSpec
from examples.data import digits
from examples.models import RAEL2, VAEGAN, WGANGP, AdversarialAE
from strategies import Adversarial, Coupled, CoupledAdversarial


def _adam(lr: float = 1e-3, **params: Any) -> OptimizerSpec:
    return OptimizerSpec("Adam", lr=lr, **params)


def workloads() -> dict[str, tuple[Any, Any]]:
    """Each reference model with the strategy that trains it."""
    gan = _adam(2e-4, betas=(0.5, 0.9))
    return {
        "aae": (
            AdversarialAE(),
            Adversarial(generator=_adam(), discriminator=_adam(), metrics=("recon_loss",)),
        ),
        "rae": (
            RAEL2(),
            Coupled(encoder=_adam(), decoder=_adam(weight_decay=1e-5), metrics=("recon_loss",)),
        ),
        "vaegan": (
            VAEGAN(),
            CoupledAdversarial(
                encoder=_adam(),
                decoder=_adam(),
                discriminator=_adam(),
                metrics=("recon_loss", "pixel_loss"),
            ),
        ),
        "wgan": (
            WGANGP(),
            Adversarial(
                generator=gan,
                discriminator=gan,
                two_phase=True,
                n_critic=5,
                generator_loss_key="generator_loss",
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=sorted(workloads()))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    model, strategy = workloads()[args.model]
    engine = Engine(
        strategy,
        EngineConfig(epochs=args.epochs, batch_size=64, seed=0, output_dir=None, log_every=10),
        callbacks=[ConsoleMetrics()],
    )
    result = engine.fit(model, digits("train"), digits("eval"))
    first, last = result.history[0], result.history[-1]
    for key in sorted(k for k in last if k.startswith(("train/", "eval/"))):
        print(
            f"{key:32s} epoch 1: {first[key]:9.4f}   epoch {len(result.history)}: {last[key]:9.4f}"
        )


if __name__ == "__main__":
    main()

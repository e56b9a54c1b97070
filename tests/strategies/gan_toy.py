"""A tiny two-phase GAN for the sequential-phase tests: every input a regulariser needs.

The batch carries its own latent codes (``{"data": x, "z": z}``), so a forward draws nothing
from the RNG and two runs over the same batches are comparable bitwise. ``phase="discriminator"``
returns the non-saturating discriminator loss and, for the penalties, ``real``/``fake`` (inputs
that require grad) with their scores and random interpolates; ``phase="generator"`` returns the
generator's loss, whose adversarial term is weighted by ``disc_factor``. ``calls`` records each
forward's phase and ``disc_factor``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class TinyGAN(nn.Module):
    def __init__(self, features: int = 3, latent: int = 2, detach_real: bool = False) -> None:
        super().__init__()
        self.generator = nn.Linear(latent, features)
        self.discriminator = nn.Sequential(nn.Linear(features, 4), nn.Tanh(), nn.Linear(4, 1))
        self.detach_real = detach_real
        self.calls: list[tuple[str | None, float | None]] = []

    def forward(
        self, batch: Any, phase: str | None = None, disc_factor: float | None = None
    ) -> dict[str, Any]:
        self.calls.append((phase, disc_factor))
        x, z = batch["data"], batch["z"]
        if phase == "discriminator":
            real = x.detach() if self.detach_real else x.detach().requires_grad_(True)
            fake = self.generator(z).detach().requires_grad_(True)
            real_scores, fake_scores = self.discriminator(real), self.discriminator(fake)
            eps = torch.linspace(0, 1, x.shape[0], dtype=x.dtype).unsqueeze(1)
            mixed = (eps * x + (1 - eps) * fake.detach()).requires_grad_(True)
            loss = F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()
            return {
                "discriminator_loss": loss,
                "real": real,
                "real_scores": real_scores,
                "fake": fake,
                "fake_scores": fake_scores,
                "interpolates": mixed,
                "interpolate_scores": self.discriminator(mixed),
            }
        if phase == "generator":
            fake = self.generator(z)
            weight = 1.0 if disc_factor is None else disc_factor
            adversarial = F.softplus(-self.discriminator(fake)).mean()
            return {"generator_loss": weight * adversarial + 0.1 * (fake - x).pow(2).mean()}
        raise ValueError(f"phase must be 'discriminator' or 'generator', got {phase!r}")


def gan_batches(count: int, size: int, seed: int, dtype: torch.dtype = torch.float32) -> list[Any]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "data": torch.randn(size, 3, generator=generator, dtype=dtype),
            "z": torch.randn(size, 2, generator=generator, dtype=dtype),
        }
        for _ in range(count)
    ]

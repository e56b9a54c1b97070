"""Benchmark-only models: a small convolutional VAE on 1x28x28 inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class ConvVAE(nn.Module):
    """Two strided convolutions down to a Gaussian latent, two transposed convolutions back;
    ``loss`` = binary cross-entropy + KL per sample, averaged (as ``examples.models.VAE``)."""

    def __init__(self, latent_dim: int = 16, channels: int = 16) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * channels * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (2 * channels, 7, 7)),
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, 1, 4, 2, 1),
            nn.Sigmoid(),
        )

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        recon_x = self.decoder(z)
        recon = F.binary_cross_entropy(recon_x, x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)
        return {"loss": (recon + kl).mean(), "recon_x": recon_x, "z": z}

"""Small reference models that follow the engine's model contract.

Each takes a batch ``{"data": x}`` (as pythae's models do) and returns a dict of named outputs:
the losses its strategy trains on, plus per-sample outputs such as ``recon_x`` and ``z``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (inp, out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(inp, out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """MLP encoder giving a mean and a log-variance (the latter unused by plain AEs)."""

    def __init__(self, input_dim: int, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.body = _mlp([input_dim, hidden, hidden])
        self.mean = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.body(x.flatten(1)))
        return self.mean(h), self.log_var(h)


class Decoder(nn.Module):
    """MLP decoder back to the input's shape, with values in (0, 1)."""

    def __init__(self, latent_dim: int, hidden: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.body = _mlp([latent_dim, hidden, hidden, math.prod(input_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(z)).view(-1, *self.input_shape)


class AE(nn.Module):
    """A plain autoencoder: ``loss`` is the summed squared error per sample, averaged."""

    def __init__(
        self, input_shape: tuple[int, ...] = (1, 8, 8), latent_dim: int = 8, hidden: int = 128
    ) -> None:
        super().__init__()
        self.config = {"input_shape": list(input_shape), "latent_dim": latent_dim, "hidden": hidden}
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        z, _log_var = self.encoder(x)
        recon_x = self.decoder(z)
        loss = F.mse_loss(recon_x, x, reduction="none").flatten(1).sum(1).mean()
        return {"loss": loss, "recon_x": recon_x, "z": z}


class VAE(nn.Module):
    """A Gaussian VAE with a Bernoulli-style reconstruction term (binary cross-entropy).

    ``loss`` = reconstruction + KL, per sample, averaged over the batch; ``sample(n)`` decodes
    draws from the standard normal prior.
    """

    def __init__(
        self, input_shape: tuple[int, ...] = (1, 8, 8), latent_dim: int = 8, hidden: int = 128
    ) -> None:
        super().__init__()
        self.config = {"input_shape": list(input_shape), "latent_dim": latent_dim, "hidden": hidden}
        self.latent_dim = latent_dim
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        mu, log_var = self.encoder(x)
        std = torch.exp(0.5 * log_var)
        z = mu + std * torch.randn_like(std)
        recon_x = self.decoder(z)
        recon = F.binary_cross_entropy(recon_x, x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)
        return {
            "loss": (recon + kl).mean(),
            "reconstruction_loss": recon.mean(),
            "reg_loss": kl.mean(),
            "recon_x": recon_x,
            "z": z,
        }

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.decoder(torch.randn(num_samples, self.latent_dim, device=device))

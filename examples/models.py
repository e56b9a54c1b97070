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
        return torch.sigmoid(self.logits(z))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid output: Bernoulli losses take it (``binary_cross_entropy`` on
        probabilities is refused under CUDA autocast, and less stable)."""
        return self.body(z).view(-1, *self.input_shape)


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

    ``loss`` = reconstruction + ``beta`` x KL, per sample, averaged over the batch (``beta`` < 1
    trades prior fit for sharper reconstructions); ``sample(n)`` decodes draws from the standard
    normal prior.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        latent_dim: int = 8,
        hidden: int = 128,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "beta": beta,
        }
        self.latent_dim = latent_dim
        self.beta = beta
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        mu, log_var = self.encoder(x)
        std = torch.exp(0.5 * log_var)
        z = mu + std * torch.randn_like(std)
        logits = self.decoder.logits(z)
        recon_x = torch.sigmoid(logits)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)
        return {
            "loss": (recon + self.beta * kl).mean(),
            "reconstruction_loss": recon.mean(),
            "reg_loss": kl.mean(),
            "recon_x": recon_x,
            "z": z,
        }

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.decoder(torch.randn(num_samples, self.latent_dim, device=device))


class AdversarialAE(nn.Module):
    """An adversarial autoencoder (pythae's Adversarial_AE), for ``Adversarial``.

    A discriminator on the latent space tells prior draws from encodings; the autoencoder is
    trained to reconstruct and to fool it. ``autoencoder_loss`` = reconstruction +
    ``adversarial_scale`` * BCE(D(z), real); ``discriminator_loss`` = BCE(D(prior), real) +
    BCE(D(z.detach()), fake). Groups: ``discriminator``, and the rest (encoder and decoder).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        latent_dim: int = 8,
        hidden: int = 128,
        adversarial_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "adversarial_scale": adversarial_scale,
        }
        self.adversarial_scale = adversarial_scale
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)
        self.discriminator = _mlp([latent_dim, hidden, 1])

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        z, _log_var = self.encoder(x)
        recon_x = self.decoder(z)
        recon = F.mse_loss(recon_x, x, reduction="none").flatten(1).sum(1).mean()
        real = torch.ones(len(z), 1, device=z.device)
        fake = torch.zeros_like(real)
        fooling = F.binary_cross_entropy_with_logits(self.discriminator(z), real)
        prior = torch.randn_like(z)
        discriminator_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(prior), real
        ) + F.binary_cross_entropy_with_logits(self.discriminator(z.detach()), fake)
        return {
            "autoencoder_loss": recon + self.adversarial_scale * fooling,
            "discriminator_loss": discriminator_loss,
            "recon_loss": recon,
            "recon_x": recon_x,
            "z": z,
        }


class RAEL2(nn.Module):
    """A regularised autoencoder with an L2 latent penalty (pythae's RAE_L2), for ``Coupled``.

    As in pythae, one loss (reconstruction + ``embedding_weight`` * |z|^2 / 2) is returned as
    both ``encoder_loss`` and ``decoder_loss``; the decoder's L2 regularisation is the decoder
    optimiser's ``weight_decay``. The strategy back-propagates it once, into both groups.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        latent_dim: int = 8,
        hidden: int = 128,
        embedding_weight: float = 1e-2,
    ) -> None:
        super().__init__()
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "embedding_weight": embedding_weight,
        }
        self.embedding_weight = embedding_weight
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        z, _log_var = self.encoder(x)
        recon_x = self.decoder(z)
        recon = F.mse_loss(recon_x, x, reduction="none").flatten(1).sum(1)
        embedding = 0.5 * z.pow(2).sum(1)
        loss = (recon + self.embedding_weight * embedding).mean()
        return {
            "encoder_loss": loss,
            "decoder_loss": loss,
            "recon_loss": recon.mean(),
            "embedding_loss": embedding.mean(),
            "recon_x": recon_x,
            "z": z,
        }


class FeatureDiscriminator(nn.Module):
    """An MLP image discriminator that also exposes its first layer's features, bounded by a
    tanh so that VAEGAN's feature-space reconstruction keeps a fixed scale."""

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Linear(input_dim, hidden)
        self.head = _mlp([hidden, hidden, 1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.features(x.flatten(1)))
        return features, self.head(features).squeeze(1)


class VAEGAN(nn.Module):
    """A VAE whose decoder is also trained against an image discriminator, with part of its
    reconstruction measured in that discriminator's feature space (Larsen et al. 2016; pythae's
    VAEGAN), for ``CoupledAdversarial``.

    Per sample, averaged over the batch:

    - ``encoder_loss`` = ``beta`` x KL + ``pixel_weight`` x pixel reconstruction (binary
      cross-entropy, as the VAE) + ``feature_weight`` x feature reconstruction;
    - ``decoder_loss`` = the same two reconstruction terms + ``adversarial_scale`` x the
      non-saturating GAN loss of the reconstructions and the decoded prior draws;
    - ``discriminator_loss`` tells data (target ``1 - label_smoothing``) from reconstructions and
      decoded prior draws (target 0).

    The pixel term anchors the reconstructions: the feature space of a moving discriminator alone
    is a poor, drifting measure of likeness (alone, it gives blurred digits). The equilibrium
    rule returns ``update_discriminator`` as a 0-d bool tensor: the discriminator rests while
    both its costs are below ``equilibrium - margin``; while one is above ``equilibrium +
    margin`` (the discriminator is losing) the adversarial term leaves the decoder's loss, so the
    decoder keeps learning to reconstruct. ``pixel_loss`` (squared error in pixel space) and
    ``recon_loss`` (feature space) are metrics on fixed definitions; ``sample(n)`` decodes draws
    from the standard normal prior.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        latent_dim: int = 8,
        hidden: int = 128,
        adversarial_scale: float = 0.5,
        equilibrium: float = 0.68,
        margin: float = 0.4,
        beta: float = 1.0,
        pixel_weight: float = 1.0,
        feature_weight: float = 1.0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "adversarial_scale": adversarial_scale,
            "equilibrium": equilibrium,
            "margin": margin,
            "beta": beta,
            "pixel_weight": pixel_weight,
            "feature_weight": feature_weight,
            "label_smoothing": label_smoothing,
        }
        self.latent_dim = latent_dim
        self.adversarial_scale = adversarial_scale
        self.equilibrium = equilibrium
        self.margin = margin
        self.beta = beta
        self.pixel_weight = pixel_weight
        self.feature_weight = feature_weight
        self.label_smoothing = label_smoothing
        self.encoder = Encoder(math.prod(input_shape), hidden, latent_dim)
        self.decoder = Decoder(latent_dim, hidden, input_shape)
        self.discriminator = FeatureDiscriminator(math.prod(input_shape), hidden)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        mu, log_var = self.encoder(x)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        logits = self.decoder.logits(z)
        recon_x = torch.sigmoid(logits)
        prior_x = self.decoder(torch.randn_like(z))
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)
        pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        true_features, true_score = self.discriminator(x)
        recon_features, recon_score = self.discriminator(recon_x)
        _, prior_score = self.discriminator(prior_x)
        feature = 0.5 * (true_features - recon_features).pow(2).sum(1)
        reconstruction = self.pixel_weight * pixel + self.feature_weight * feature
        # each loss reaches its own group only, so the scores need no detaching here
        true_cost = _bce(true_score, 1.0 - self.label_smoothing)
        fake_cost = 0.5 * (_bce(recon_score, 0.0) + _bce(prior_score, 0.0))
        generator_cost = 0.5 * (_bce(recon_score, 1.0) + _bce(prior_score, 1.0))
        low, high = self.equilibrium - self.margin, self.equilibrium + self.margin
        update_discriminator = (true_cost >= low) | (fake_cost >= low)
        decoder_adversarial = ((true_cost <= high) & (fake_cost <= high)).to(x.dtype)
        adversarial = self.adversarial_scale * decoder_adversarial * generator_cost
        flag_on = torch.ones((), dtype=torch.bool, device=x.device)
        return {
            "encoder_loss": (self.beta * kl + reconstruction).mean(),
            "decoder_loss": reconstruction.mean() + adversarial,
            "discriminator_loss": true_cost + fake_cost,
            "update_encoder": flag_on,
            "update_decoder": flag_on,
            "update_discriminator": update_discriminator,
            "recon_loss": feature.mean(),
            "pixel_loss": F.mse_loss(recon_x, x, reduction="none").flatten(1).sum(1).mean(),
            "reg_loss": kl.mean(),
            "generator_loss": generator_cost,
            "recon_x": recon_x,
            "z": z,
        }

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.decoder(torch.randn(num_samples, self.latent_dim, device=device))


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` against a constant ``target``, averaged."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class WGANGP(nn.Module):
    """A Wasserstein GAN with gradient penalty, trained in two phases by
    ``Adversarial(two_phase=True, n_critic=5, generator_loss_key="generator_loss")``.

    ``phase="discriminator"``: ``discriminator_loss`` = D(fake) - D(real) + ``gp_weight`` * the
    gradient penalty (the penalty needs autograd, so evaluation under no-grad leaves it out);
    ``phase="generator"``: ``generator_loss`` = -D(fake). Without a phase it returns both.
    Groups: ``discriminator`` (the critic) and the rest (the generator).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        latent_dim: int = 8,
        hidden: int = 128,
        gp_weight: float = 10.0,
    ) -> None:
        super().__init__()
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "gp_weight": gp_weight,
        }
        self.latent_dim = latent_dim
        self.gp_weight = gp_weight
        self.generator = Decoder(latent_dim, hidden, input_shape)
        self.discriminator = _mlp([math.prod(input_shape), hidden, hidden, 1])

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x.flatten(1)).squeeze(1)

    def forward(
        self, batch: dict[str, torch.Tensor], phase: str | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        if phase not in (None, "discriminator", "generator"):
            raise ValueError(f"phase must be 'discriminator', 'generator' or None, got {phase!r}")
        x = batch["data"]
        fake = self.generator(torch.randn(len(x), self.latent_dim, device=x.device))
        outputs: dict[str, torch.Tensor] = {"fake_x": fake}
        if phase in (None, "discriminator"):
            loss = self.critic(fake.detach()).mean() - self.critic(x).mean()
            if torch.is_grad_enabled():
                loss = loss + self.gp_weight * self._gradient_penalty(x, fake.detach())
            outputs["discriminator_loss"] = loss
        if phase in (None, "generator"):
            outputs["generator_loss"] = -self.critic(fake).mean()
        return outputs

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        alpha = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(mixed).sum(), mixed, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.generator(torch.randn(num_samples, self.latent_dim, device=device))

"""Convolutional GAN examples for the digits: a DCGAN and a VQGAN-style autoencoder.

Both follow the two-phase contract of ``Adversarial(two_phase=True)`` (sequential phases):
``forward(batch, phase="discriminator")`` returns ``discriminator_loss`` and, for the gradient
penalties of ``strategies/regularisers.py``, the discriminator's inputs and scores (``real`` and
``real_scores`` for R1, ``fake`` and ``fake_scores`` for R2; the inputs require grad while
training); ``forward(batch, phase="generator")`` returns the generator's loss
(``generator_loss`` for the DCGAN, ``autoencoder_loss`` for the autoencoder); ``phase=None``
returns everything (evaluation, pictures). The discriminator is ``model.discriminator``; the
generator role is every other parameter. Images are in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from strategies.adaptive_weight import adaptive_weight

PHASES = (None, "discriminator", "generator")


def _check_phase(phase: str | None) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")


def _check_size(image_size: int, halvings: int) -> int:
    step = 2**halvings
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size % step:
        raise ValueError(f"image_size must be a multiple of {step}, got {image_size!r}")
    return image_size // step


# ----------------------------------------------------------------------------- DCGAN


class DCGANGenerator(nn.Module):
    """Noise (N, latent_dim) -> images (N, C, size, size): a linear projection to
    (2 * width, size / 4, size / 4), then two stride-2 transposed convolutions with BatchNorm and
    ReLU (Radford et al. 2016), a sigmoid at the end."""

    def __init__(self, latent_dim: int, width: int, channels: int, image_size: int) -> None:
        super().__init__()
        self.base = _check_size(image_size, 2)
        self.width = width
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * self.base * self.base, bias=False),
            nn.BatchNorm1d(2 * width * self.base * self.base),
            nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        h = self.project(noise).view(-1, 2 * self.width, self.base, self.base)
        return torch.sigmoid(self.body(h))


class DCGANDiscriminator(nn.Module):
    """Images -> one logit each: two stride-2 convolutions with LeakyReLU(0.2), then a linear
    layer. No BatchNorm, so a gradient penalty on real images (R1) is per sample."""

    def __init__(self, width: int, channels: int, image_size: int) -> None:
        super().__init__()
        base = _check_size(image_size, 2)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * base * base, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).squeeze(1)


class DCGAN(nn.Module):
    """A DCGAN with the non-saturating logistic loss (Goodfellow et al. 2014, as StyleGAN2).

    ``phase="discriminator"``: ``discriminator_loss`` = softplus(D(G(z))) + softplus(-D(x)),
    with ``real``/``real_scores`` and ``fake``/``fake_scores`` for a gradient penalty (R1 is
    ``Adversarial(regularisers=(r1(gamma),), regularise_every=16)``); ``phase="generator"``:
    ``generator_loss`` = softplus(-D(G(z))). ``sample(noise)`` (or ``sample(n)``) decodes noise
    to images; ``latent_shape`` tells a sampler the noise shape.
    """

    def __init__(
        self, image_size: int = 16, channels: int = 1, latent_dim: int = 32, width: int = 32
    ) -> None:
        super().__init__()
        self.config = {
            "image_size": image_size,
            "channels": channels,
            "latent_dim": latent_dim,
            "width": width,
        }
        self.latent_dim = latent_dim
        self.latent_shape = (latent_dim,)
        self.generator = DCGANGenerator(latent_dim, width, channels, image_size)
        self.discriminator = DCGANDiscriminator(width, channels, image_size)

    def forward(
        self, batch: dict[str, torch.Tensor], phase: str | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        _check_phase(phase)
        x = batch["data"]
        noise = torch.randn(len(x), self.latent_dim, device=x.device)
        if phase == "discriminator":  # no generator graph: only the discriminator steps here
            with torch.no_grad():
                fake = self.generator(noise)
        else:
            fake = self.generator(noise)
        outputs: dict[str, torch.Tensor] = {"fake_x": fake}
        if phase in (None, "discriminator"):
            grad = torch.is_grad_enabled()
            real = x.detach().requires_grad_(grad)
            fake_in = fake.detach().requires_grad_(grad)
            real_scores = self.discriminator(real)
            fake_scores = self.discriminator(fake_in)
            outputs.update(
                discriminator_loss=F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean(),
                real=real,
                real_scores=real_scores,
                fake=fake_in,
                fake_scores=fake_scores,
            )
        if phase in (None, "generator"):
            outputs["generator_loss"] = F.softplus(-self.discriminator(fake)).mean()
        return outputs

    def sample(self, noise: torch.Tensor | int) -> torch.Tensor:
        """Images from ``noise`` (N, latent_dim), or from ``noise`` fresh draws if an int."""
        device = next(self.parameters()).device
        if isinstance(noise, int):
            noise = torch.randn(noise, self.latent_dim, device=device)
        with torch.no_grad():
            return self.generator(noise.to(device))


# ----------------------------------------------------------------------------- VQGAN


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (van den Oord et al.
    2017): ``codebook_loss`` = |sg(z) - e|^2 + ``commitment`` * |z - sg(e)|^2. With
    ``normalize`` the latents and the codes are compared on the unit sphere (l2-normalised, as
    in Yu et al. 2022's ViT-VQGAN), which keeps every code in use on small data."""

    def __init__(
        self, codebook_size: int, code_dim: int, commitment: float, normalize: bool = True
    ) -> None:
        super().__init__()
        self.commitment = commitment
        self.normalize = normalize
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d, h, w = z.shape
        codes = self.codebook.weight
        if self.normalize:
            z, codes = F.normalize(z, dim=1), F.normalize(codes, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        )
        index = distances.argmin(1)
        quantized = codes[index].view(n, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(quantized, z.detach()) + self.commitment * F.mse_loss(
            z, quantized.detach()
        )
        return z + (quantized - z).detach(), loss, index.view(n, h, w)


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): a logit per overlapping patch, (N, 1, h, w)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 1, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class ConvAutoencoder(nn.Module):
    """A convolutional autoencoder halving the image once: encoder, bottleneck (a
    ``VectorQuantizer``, or a Gaussian with a KL term), decoder with a sigmoid output."""

    def __init__(
        self,
        channels: int,
        width: int,
        bottleneck: str,
        code_dim: int,
        codebook_size: int,
        commitment: float,
        kl_weight: float,
    ) -> None:
        super().__init__()
        if bottleneck not in ("vq", "kl"):
            raise ValueError(f"bottleneck must be 'vq' or 'kl', got {bottleneck!r}")
        self.kl_weight = kl_weight
        out = code_dim if bottleneck == "vq" else 2 * code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(2 * width, out, 1),
        )
        self.quantizer = (
            VectorQuantizer(codebook_size, code_dim, commitment) if bottleneck == "vq" else None
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, 2 * width, 3, 1, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, 1, 1),
        )

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last convolution weight (where VQGAN's adaptive weight is taken)."""
        layer = self.decoder[-1]
        assert isinstance(layer, nn.Conv2d)
        return layer.weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent and the bottleneck's loss (codebook, or ``kl_weight`` x KL)."""
        h = self.encoder(x)
        if self.quantizer is not None:
            quantized, loss, _ = self.quantizer(h)
            return quantized, loss
        mean, log_var = h.chunk(2, dim=1)
        log_var = log_var.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1).sum(1).mean()
        return z, self.kl_weight * kl

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions and the bottleneck's loss."""
        z, loss = self.encode(x)
        return self.decode(z), loss


class VQGAN(nn.Module):
    """A VQGAN-style convolutional autoencoder (Esser et al. 2021) with a PatchGAN
    discriminator and the hinge loss; or, with ``bottleneck="kl"``, a KL autoencoder as in
    latent diffusion (Rombach et al. 2022). ``model.autoencoder`` is the generator role (an EMA
    of it: ``EMA(module="autoencoder")``), ``model.discriminator`` the other.

    ``phase="generator"``: ``autoencoder_loss`` = L1 reconstruction + the bottleneck's loss
    (codebook, or ``kl_weight`` x KL) + ``disc_factor`` x ``d_weight`` x (-mean D(x_hat)), where
    ``d_weight`` = ``disc_weight`` x VQGAN's adaptive weight at the decoder's last layer
    (``strategies/adaptive_weight.py``: the ratio of the two losses' gradient norms there,
    clamped to ``max_d_weight``, detached). ``disc_factor`` comes from the strategy:
    ``Adversarial(disc_start=N)`` passes 0.0 before window ``N`` (and runs no discriminator
    phase), 1.0 from it on; without it the adversarial term is always on.
    ``phase="discriminator"``: the hinge loss mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))),
    with ``real``/``real_scores`` for an R1 penalty. Outputs also ``recon_loss``,
    ``codebook_loss``, ``d_weight`` (0 while ``disc_factor`` is 0), ``generator_loss`` and
    ``recon_x``.
    """

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        width: int = 32,
        bottleneck: str = "vq",
        code_dim: int = 16,
        codebook_size: int = 64,
        commitment: float = 0.25,
        kl_weight: float = 1e-4,
        disc_weight: float = 0.5,
        max_d_weight: float = 1e4,
    ) -> None:
        super().__init__()
        _check_size(image_size, 1)
        self.config = {
            "image_size": image_size,
            "channels": channels,
            "width": width,
            "bottleneck": bottleneck,
            "code_dim": code_dim,
            "codebook_size": codebook_size,
            "commitment": commitment,
            "kl_weight": kl_weight,
            "disc_weight": disc_weight,
            "max_d_weight": max_d_weight,
        }
        self.disc_weight = disc_weight
        self.max_d_weight = max_d_weight
        self.autoencoder = ConvAutoencoder(
            channels, width, bottleneck, code_dim, codebook_size, commitment, kl_weight
        )
        self.discriminator = PatchDiscriminator(channels, width)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        phase: str | None = None,
        disc_factor: float = 1.0,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        _check_phase(phase)
        x = batch["data"]
        recon_x, bottleneck_loss = self.autoencoder(x)
        outputs: dict[str, torch.Tensor] = {"recon_x": recon_x}
        if phase in (None, "generator"):
            recon = (recon_x - x).abs().mean()
            adversarial = -self.discriminator(recon_x).mean()
            if disc_factor > 0 and self.training:
                weight = self.disc_weight * adaptive_weight(
                    recon, adversarial, self.autoencoder.last_layer, self.max_d_weight
                )
            else:
                weight = torch.zeros((), device=x.device)
            outputs.update(
                autoencoder_loss=recon + bottleneck_loss + disc_factor * weight * adversarial,
                recon_loss=recon,
                codebook_loss=bottleneck_loss,
                generator_loss=adversarial,
                d_weight=weight,
            )
        if phase in (None, "discriminator"):
            real = x.detach().requires_grad_(torch.is_grad_enabled())
            real_scores = self.discriminator(real)
            fake_scores = self.discriminator(recon_x.detach())
            outputs.update(
                discriminator_loss=F.relu(1.0 - real_scores).mean()
                + F.relu(1.0 + fake_scores).mean(),
                real=real,
                real_scores=real_scores,
            )
        return outputs

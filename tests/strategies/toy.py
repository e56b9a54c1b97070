"""A tiny model whose every loss reaches every parameter group, for the strategy tests.

``CoupledToy`` has ``encoder``, ``decoder`` and ``discriminator`` submodules; each of its four
losses depends on all of them (nothing is detached), so any leak between groups shows in the
gradients. Flags are set on the model per test (Python bools or 0-d bool tensors).
``phase="discriminator"``/``"generator"`` returns one phase's loss, as a two-phase GAN does.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.context import StepContext
from engine.state import Progress

FLAG_KEYS = ("update_encoder", "update_decoder", "update_discriminator", "update_generator")


class CoupledToy(nn.Module):
    def __init__(self, features: int = 3, latent: int = 2, same_coupled_loss: bool = False):
        super().__init__()
        self.encoder = nn.Linear(features, latent)
        self.decoder = nn.Linear(latent, features)
        self.discriminator = nn.Linear(features, 1)
        self.same_coupled_loss = same_coupled_loss
        self.flags: dict[str, Any] = {}
        self.phases: list[str | None] = []

    def forward(self, batch: Any, phase: str | None = None, **_: Any) -> dict[str, Any]:
        self.phases.append(phase)
        x = batch["data"] if isinstance(batch, Mapping) else batch
        z = torch.tanh(self.encoder(x))
        recon = self.decoder(z)
        score_real = self.discriminator(x).mean()
        score_fake = self.discriminator(recon).pow(2).mean()
        recon_loss = (recon - x).pow(2).mean()
        discriminator_loss = score_fake - 0.5 * score_real + 0.1 * z.pow(2).mean()
        generator_loss = recon_loss - 0.3 * score_fake
        encoder_loss = recon_loss + 0.2 * z.pow(2).mean() + 0.1 * score_fake
        decoder_loss = encoder_loss if self.same_coupled_loss else recon_loss - 0.4 * score_fake
        outputs: dict[str, Any] = {
            "encoder_loss": encoder_loss,
            "decoder_loss": decoder_loss,
            "discriminator_loss": discriminator_loss,
            "autoencoder_loss": generator_loss,
            "recon_loss": recon_loss,
        }
        if phase == "discriminator":
            outputs = {"discriminator_loss": discriminator_loss}
        elif phase == "generator":
            outputs = {"autoencoder_loss": generator_loss}
        outputs.update(self.flags)
        return outputs


def make_ctx(
    *,
    micro_index: int = 0,
    micro_count: int = 1,
    grad_clip_norm: float | None = None,
    nonfinite: str = "raise",
) -> StepContext:
    return StepContext(
        device=torch.device("cpu"),
        precision="fp32",
        autocast=contextlib.nullcontext,
        scaler=None,
        grad_clip_norm=grad_clip_norm,
        nonfinite=nonfinite,
        progress=Progress(),
        micro_index=micro_index,
        micro_count=micro_count,
    )


def params_of(module: nn.Module) -> list[torch.Tensor]:
    return [param.detach().clone() for param in module.parameters()]


def own_gradients(
    model: nn.Module,
    batch: Any,
    loss_key: str,
    group: nn.Module | list[nn.Module],
    phase: str | None = None,
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` of one loss with respect to one group, on a copy of the model."""
    twin = copy.deepcopy(model)
    twin.phases = []
    outputs = twin(batch, phase=phase) if phase else twin(batch)
    modules = group if isinstance(group, list) else [group]
    names = {id(m): n for n, m in model.named_modules()}
    params = [p for m in modules for p in twin.get_submodule(names[id(m)]).parameters()]
    grads = torch.autograd.grad(outputs[loss_key], params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

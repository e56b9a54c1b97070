"""VQGAN's adaptive weight of the adversarial term, for a model's generator forward to call.

taming-transformers' ``VQLPIPSWithDiscriminator`` weighs its generator's adversarial loss by
``|grad_w reconstruction| / (|grad_w adversarial| + 1e-4)``, the gradients taken at the weight
``w`` of the decoder's last layer, clamped to ``[0, 1e4]`` and detached, so that the two terms
pull on the decoder with comparable strength. Here it is one function::

    d_weight = adaptive_weight(rec_loss, g_loss, self.decoder.conv_out.weight)
    loss = rec_loss + d_weight * disc_factor * g_loss       # disc_factor: see Adversarial
    return {"autoencoder_loss": loss, "d_weight": d_weight, ...}

and ``Adversarial(..., metrics=("d_weight",))`` logs it. The gradients come from
``torch.autograd.grad`` with the graph kept: nothing is written into any ``.grad``, so the
strategy's isolated backward of the generator's loss is unchanged.

Mixed precision: the norms are computed in fp32 from the gradients (whatever their dtype), and a
norm that is not finite (a half-precision overflow) gives a weight of 0 for that step rather
than a NaN that would poison the loss; users of taming's code under fp16 meet exactly that NaN.
Without a graph (evaluation under ``no_grad``) the weight is 0, as in taming.
"""

from __future__ import annotations

import torch

from engine.config.validators import finite_non_negative_number, positive_number
from engine.errors import ModelOutputError


def adaptive_weight(
    reconstruction: torch.Tensor,
    adversarial: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``clamp(|grad rec| / (|grad adv| + eps), 0, max_weight)`` at ``last_layer``, detached
    (an fp32 scalar, fp64 for an fp64 layer, on the layer's device)."""
    finite_non_negative_number.require("max_weight", max_weight)
    positive_number.require("eps", eps)
    dtype = torch.promote_types(last_layer.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=last_layer.device)
    if not (torch.is_grad_enabled() and reconstruction.requires_grad and adversarial.requires_grad):
        return zero
    rec = _gradient_norm(reconstruction, last_layer, "reconstruction")
    adv = _gradient_norm(adversarial, last_layer, "adversarial")
    weight = torch.clamp(rec / (adv + eps), 0.0, max_weight)
    return torch.where(torch.isfinite(rec) & torch.isfinite(adv), weight, zero).detach()


def _gradient_norm(loss: torch.Tensor, layer: torch.Tensor, name: str) -> torch.Tensor:
    """``|d loss / d layer|`` in fp32; a loss that does not reach ``layer`` is an error."""
    (grad,) = torch.autograd.grad(loss, [layer], retain_graph=True, allow_unused=True)
    if grad is None:
        raise ModelOutputError(
            f"adaptive_weight: the {name} loss does not depend on last_layer (a tensor of shape "
            f"{tuple(layer.shape)}); pass the weight of the decoder's last layer"
        )
    grad = grad.detach()
    return torch.linalg.vector_norm(grad.to(torch.promote_types(grad.dtype, torch.float32)))

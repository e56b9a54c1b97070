"""Gradient penalties on a discriminator's input, as composable parts of a phase.

A penalty reads two outputs of the phase's forward: ``inputs``, the tensor the discriminator
scored (it must require grad: e.g. ``real.detach().requires_grad_(True)``), and ``scores``, its
scores for them. It is the mean over samples of a function of the gradient of ``scores.sum()``
with respect to ``inputs``, taken with ``create_graph=True`` so that its own backward reaches the
discriminator's parameters:

* ``r1(gamma)``: ``gamma / 2 * |grad|^2`` on real samples (Mescheder et al. 2018; StyleGAN2);
* ``r2(gamma)``: the same on generated samples;
* ``wgan_gp(weight)``: ``weight * (|grad| - 1)^2`` on random interpolates of real and generated
  samples (Gulrajani et al. 2017, Algorithm 1).

Under fp16 with a GradScaler the gradient is taken of the *scaled* scores (so that small
gradients do not underflow in half precision), then divided by the scale in fp32; the square
and the mean are computed in fp32. A step whose penalty overflowed is left to the scaler, which
skips the optimiser step and lowers the scale, as for any overflowing gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

from engine.config.validators import (
    finite_non_negative_number,
    instance_of,
    non_empty_str,
    optional,
)
from engine.context import StepContext
from engine.errors import ModelOutputError


@attrs.frozen
class GradientPenalty:
    """``weight * mean_i f(|d scores / d inputs_i|)``: ``f(n) = n^2`` when ``target`` is None
    (R1, R2), else ``(n - target)^2`` (WGAN-GP). ``name`` is the metric it is logged under."""

    name: str = attrs.field(validator=non_empty_str)
    inputs: str = attrs.field(validator=non_empty_str)
    scores: str = attrs.field(validator=non_empty_str)
    weight: float = attrs.field(validator=finite_non_negative_number)
    target: float | None = attrs.field(default=None, validator=optional(finite_non_negative_number))

    def check(self, outputs: Mapping[str, Any], where: str) -> None:
        """Refuse outputs that lack ``inputs`` or ``scores``, or whose ``inputs`` does not
        require grad (its gradient could not be taken), naming the key and ``where``."""
        for key in (self.inputs, self.scores):
            if not isinstance(outputs.get(key), torch.Tensor):
                raise ModelOutputError(
                    f"regulariser {self.name!r} reads output {key!r}, which {where} does not "
                    f"return as a tensor; keys present: {sorted(outputs)}"
                )
        if not outputs[self.inputs].requires_grad:
            raise ModelOutputError(
                f"regulariser {self.name!r} needs output {self.inputs!r} of {where} to require "
                "grad (the discriminator's input, e.g. x.detach().requires_grad_(True)); it does "
                "not, so its gradient can not be taken"
            )

    def penalty(self, outputs: Mapping[str, Any], ctx: StepContext, where: str) -> torch.Tensor:
        """The penalty (an fp32 or fp64 scalar), differentiable with respect to the
        discriminator."""
        self.check(outputs, where)
        grad = input_gradient(outputs[self.scores], outputs[self.inputs], ctx)
        if grad is None:
            raise ModelOutputError(
                f"regulariser {self.name!r}: output {self.scores!r} of {where} does not depend "
                f"on output {self.inputs!r}, so it has no gradient with respect to it"
            )
        per_sample = grad.flatten(1) if grad.ndim > 1 else grad.reshape(-1, 1)
        if self.target is None:
            value = per_sample.square().sum(dim=1)
        else:
            value = (torch.linalg.vector_norm(per_sample, dim=1) - self.target).square()
        return value.mean() * self.weight


def input_gradient(
    scores: torch.Tensor, inputs: torch.Tensor, ctx: StepContext
) -> torch.Tensor | None:
    """``d scores.sum() / d inputs`` in (at least) fp32, the graph kept for a second backward; taken
    of the scaled sum under a GradScaler and unscaled after. None when ``scores`` does not
    depend on ``inputs``."""
    total = _at_least_fp32(scores).sum()
    scale = None
    if ctx.scaler is not None:
        scale = ctx.scaler.scale(torch.ones((), device=total.device))
        total = total * scale
    (grad,) = torch.autograd.grad(total, [inputs], create_graph=True, allow_unused=True)
    if grad is None:
        return None
    grad = _at_least_fp32(grad)
    return grad if scale is None else grad / scale


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Half precision in fp32; fp32 and fp64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def r1(gamma: float, inputs: str = "real", scores: str = "real_scores") -> GradientPenalty:
    """R1: ``gamma / 2 * E|grad D(x)|^2`` on real samples ``x`` (StyleGAN2's ``r1_gamma``)."""
    return GradientPenalty("r1_penalty", inputs, scores, _half(gamma, "gamma"))


def r2(gamma: float, inputs: str = "fake", scores: str = "fake_scores") -> GradientPenalty:
    """R2: ``gamma / 2 * E|grad D(x)|^2`` on generated samples ``x``."""
    return GradientPenalty("r2_penalty", inputs, scores, _half(gamma, "gamma"))


def wgan_gp(
    weight: float = 10.0, inputs: str = "interpolates", scores: str = "interpolate_scores"
) -> GradientPenalty:
    """WGAN-GP: ``weight * E(|grad D(x)| - 1)^2`` on interpolates of real and generated
    samples (the model draws them: ``eps * real + (1 - eps) * fake``, requiring grad)."""
    return GradientPenalty("gradient_penalty", inputs, scores, weight, target=1.0)


def as_penalties(value: Iterable[GradientPenalty]) -> tuple[GradientPenalty, ...]:
    """A field's regularisers as a tuple (the converter of ``regularisers`` fields)."""
    return tuple(value)


def penalties(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """The validator of ``regularisers`` fields: each one a ``GradientPenalty``."""
    for penalty in value:
        instance_of(GradientPenalty).require(f"each of {attribute.name}", penalty)


def _half(gamma: Any, name: str) -> float:
    finite_non_negative_number.require(name, gamma)
    return float(gamma) / 2

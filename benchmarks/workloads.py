"""The workloads of the suite: a model, its input shape, its strategy, how many samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from benchmarks.grouped import STRATEGIES, grouped_runners
from benchmarks.harness import Runner
from benchmarks.loops import LR, ModelFactory, compiled_runner, standard_runners
from benchmarks.models import ConvVAE
from benchmarks.peers import PEER_RUNNERS
from engine import OptimizerSpec
from examples.models import RAEL2, VAE, VAEGAN, AdversarialAE
from strategies import Standard


@attrs.frozen
class Workload:
    """``strategy`` is ``Standard`` or a multi-optimiser strategy's name; ``peers`` says whether
    pythae, Ignite and Lightning are measured on it (they take ``Standard`` models)."""

    name: str
    strategy: str
    make_model: ModelFactory
    shape: tuple[int, ...]
    samples: int
    peers: bool = False

    def data(self, samples: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand((samples or self.samples, *self.shape), generator=generator)

    def runners(
        self,
        data: torch.Tensor,
        batch_size: int,
        device: torch.device,
        peers: list[str],
        compiled: bool = False,
    ) -> list[Runner]:
        """The floor first, then the engine, the other loops, the compiled engine (when
        ``compiled``) and the peers."""
        if self.strategy != "Standard":
            runners = grouped_runners(self.strategy, self.make_model, data, batch_size, device)
            if compiled:
                runners.append(self.compiled_runner(data, batch_size, device))
            return runners
        runners = standard_runners(self.make_model, data, batch_size, device)
        if compiled:
            runners.append(self.compiled_runner(data, batch_size, device))
        if self.peers:
            torch.manual_seed(0)
            template = self.make_model()
            runners += [PEER_RUNNERS[peer](template, data, batch_size, device) for peer in peers]
        return runners

    def compiled_runner(
        self, data: torch.Tensor, batch_size: int, device: torch.device, mode: str = "step"
    ) -> Runner:
        """The engine with ``compile=mode`` and this workload's strategy (fused Adam)."""
        if self.strategy == "Standard":

            def make_strategy() -> Any:
                return Standard(OptimizerSpec("Adam", lr=LR))

        else:
            make_strategy = STRATEGIES[self.strategy][0]
        torch.manual_seed(0)
        return compiled_runner(make_strategy, self.make_model(), data, batch_size, device, mode)


def _mlp(cls: Callable[..., torch.nn.Module], shape: tuple[int, ...], **kw: int) -> ModelFactory:
    return lambda: cls(input_shape=shape, **kw)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp_vae_1x4x4", "Standard", _mlp(VAE, (1, 4, 4)), (1, 4, 4), 20_000, True),
        Workload(
            "mlp_vae_1x28x28",
            "Standard",
            _mlp(VAE, (1, 28, 28), hidden=256, latent_dim=16),
            (1, 28, 28),
            4_096,
            True,
        ),
        Workload("conv_vae_1x28x28", "Standard", ConvVAE, (1, 28, 28), 1_024),
        Workload(
            "adversarial_ae_1x4x4", "Adversarial", _mlp(AdversarialAE, (1, 4, 4)), (1, 4, 4), 10_000
        ),
        Workload("rae_l2_1x4x4", "Coupled", _mlp(RAEL2, (1, 4, 4)), (1, 4, 4), 20_000),
        Workload("vaegan_1x4x4", "CoupledAdversarial", _mlp(VAEGAN, (1, 4, 4)), (1, 4, 4), 10_000),
    )
}

"""Strategy factories for the GAN example configs: what a TOML table can not spell yet.

A config names a factory as its strategy (``[strategy] name = "examples.gan_strategies:..."``);
the CLI passes the role tables ``[strategy.optimizers.generator]`` and
``[strategy.optimizers.discriminator]`` as ``generator``/``discriminator``, the other keys of
``[strategy]`` as they are.
"""

from __future__ import annotations

from engine.config.specs import OptimizerSpec, SchedulerSpec
from strategies import Adversarial
from strategies.regularisers import r1


def adversarial_r1(
    generator: OptimizerSpec,
    discriminator: OptimizerSpec,
    generator_scheduler: SchedulerSpec | None = None,
    discriminator_scheduler: SchedulerSpec | None = None,
    r1_gamma: float = 0.1,
    regularise_every: int = 16,
    n_critic: int = 1,
    generator_loss_key: str = "generator_loss",
    metrics: tuple[str, ...] = (),
) -> Adversarial:
    """Two-phase ``Adversarial`` (sequential: the generator steps against the just-updated
    discriminator) with StyleGAN2's lazy R1: ``r1(r1_gamma)`` on the discriminator's real inputs
    every ``regularise_every`` windows, its loss times that interval, the discriminator's Adam
    corrected by ``k / (k + 1)``."""
    return Adversarial(
        generator=generator,
        discriminator=discriminator,
        generator_scheduler=generator_scheduler,
        discriminator_scheduler=discriminator_scheduler,
        two_phase=True,
        n_critic=n_critic,
        generator_loss_key=generator_loss_key,
        metrics=tuple(metrics),
        regularisers=(r1(r1_gamma),),
        regularise_every=regularise_every,
    )

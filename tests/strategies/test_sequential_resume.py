"""A sequential Adversarial stopped mid-cycle (between generator windows, between lazy
regulariser windows, before disc_start) and resumed from its checkpoint ends bitwise where the
uninterrupted run ends: parameters, optimiser states, windows and every logged metric."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import Checkpointing
from engine import Engine, EngineConfig, RunState
from engine.checkpoint.format import latest_checkpoint
from engine.config.specs import OptimizerSpec
from strategies import Adversarial, r1
from tests.engine.checkpoint_cases import equal, without_seconds
from tests.strategies.gan_toy import TinyGAN


class StopAfter:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step == self.step:
            run.engine.stop()


def _case(seed: int, n_critic: int, every: int, disc_start: int) -> tuple[TinyGAN, Adversarial]:
    torch.manual_seed(seed)
    strategy = Adversarial(
        generator=OptimizerSpec("Adam", lr=1e-2),
        discriminator=OptimizerSpec("Adam", lr=1e-2, betas=(0.0, 0.99)),
        two_phase=True,
        n_critic=n_critic,
        generator_loss_key="generator_loss",
        regularisers=(r1(1.0),),
        regularise_every=every,
        disc_start=disc_start,
    )
    return TinyGAN(), strategy


def _run(
    tmp: Path, case: tuple[TinyGAN, Adversarial], accumulate: int, callbacks: list[Any], resume: Any
) -> Any:
    model, strategy = case
    config = EngineConfig(
        epochs=2,
        batch_size=2,
        accumulate_steps=accumulate,
        log_every=1,
        device="cpu",
        output_dir=tmp,
        run_name="run",
        monitor="skipped_steps",
    )
    data = {
        "data": torch.randn(12, 3, generator=torch.Generator().manual_seed(3)),
        "z": torch.randn(12, 2, generator=torch.Generator().manual_seed(4)),
    }
    return Engine(strategy, config, callbacks).fit(model, data, resume=resume)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    accumulate=st.integers(1, 3),
    n_critic=st.integers(1, 3),
    every=st.integers(1, 4),
    disc_start=st.integers(0, 3),
    where=st.floats(0.0, 1.0),
)
def test_a_run_resumed_mid_cycle_equals_the_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory,
    accumulate: int,
    n_critic: int,
    every: int,
    disc_start: int,
    where: float,
) -> None:
    tmp = tmp_path_factory.mktemp("sequential")
    options = {"n_critic": n_critic, "every": every, "disc_start": disc_start}
    straight = _case(0, **options)
    result_a = _run(tmp / "a", straight, accumulate, [], None)

    stop = 1 + int(where * (2 * math.ceil(12 / 2) - 1))
    saving = Checkpointing(every_n_steps=1, durable=False)
    _run(tmp / "b", _case(0, **options), accumulate, [saving, StopAfter(stop)], None)
    resume = "last" if latest_checkpoint(tmp / "b" / "run") is not None else None
    resumed = _case(0 if resume is None else 1, **options)
    result_c = _run(tmp / "b", resumed, accumulate, [Checkpointing(durable=False)], resume)

    assert equal(straight[0].state_dict(), resumed[0].state_dict())
    assert equal(straight[1].state_dict(), resumed[1].state_dict())
    assert without_seconds(result_a.history) == without_seconds(result_c.history)

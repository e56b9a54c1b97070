"""No host-device synchronisation per training step.

A sync happens where a device value is read on the host: ``.item()``, ``.cpu()``, ``.tolist()``,
``.numpy()``, ``bool()``/``float()``/``int()`` of a tensor (Python branching on a tensor value).
``torch.cuda.set_sync_debug_mode`` only exists on CUDA, so on the CPU these methods are wrapped
(in this test only) to count the calls our own packages make. The hot path must make none: a
train step alone makes zero, and a whole fit makes as many with ``n`` steps as with ``2n`` (the
reads left happen at the log interval and epoch end, not per step).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig, Event, OptimizerSpec, Progress, StepContext
from engine.distributed.collectives import World
from engine.hardware.precision import autocast_factory
from strategies import Adversarial, Coupled, Standard
from tests.helpers import TinyRegressor

REPO = Path(__file__).resolve().parents[2]
OUR_PACKAGES = tuple(str(REPO / name) for name in ("engine", "strategies", "callbacks"))
SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


class SyncCounter:
    """Counts host reads of tensor values made from our packages while ``active``."""

    def __init__(self) -> None:
        self.active = True
        self.calls: list[str] = []

    def wrap(self, name: str) -> Any:
        original = getattr(torch.Tensor, name)
        counter = self

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if counter.active and caller.f_code.co_filename.startswith(OUR_PACKAGES):
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
                counter.calls.append(f"Tensor.{name} at {where}")
            return original(tensor, *args, **kwargs)

        return counted


@contextlib.contextmanager
def counting_syncs() -> Iterator[SyncCounter]:
    counter = SyncCounter()
    with contextlib.ExitStack() as stack:
        for name in SYNC_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, counter.wrap(name)))
        yield counter


class AdversarialAE(nn.Module):
    """One forward, two losses: the autoencoder's and the discriminator's (on detached codes)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 2)
        self.decoder = nn.Linear(2, 6)
        self.discriminator = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        z = self.encoder(x)
        recon = (self.decoder(z) - x).pow(2).mean()
        fooled = self.discriminator(z).mean()
        prior = self.discriminator(torch.randn_like(z)).mean()
        return {
            "autoencoder_loss": recon - 0.1 * fooled,
            "discriminator_loss": self.discriminator(z.detach()).mean() - prior,
        }


class RAE(nn.Module):
    """Encoder and decoder losses as one tensor, as pythae's RAE_L2 returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 2)
        self.decoder = nn.Linear(2, 6)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        z = self.encoder(x)
        loss = (self.decoder(z) - x).pow(2).mean() + 1e-2 * z.pow(2).mean()
        return {"encoder_loss": loss, "decoder_loss": loss}


CASES = {
    "standard": (lambda: TinyRegressor(6), lambda: Standard(OptimizerSpec("Adam", lr=1e-2))),
    "adversarial": (
        AdversarialAE,
        lambda: Adversarial(
            generator=OptimizerSpec("Adam", lr=1e-2), discriminator=OptimizerSpec("SGD", lr=1e-2)
        ),
    ),
    "coupled": (
        RAE,
        lambda: Coupled(
            encoder=OptimizerSpec("Adam", lr=1e-2), decoder=OptimizerSpec("Adam", lr=1e-2)
        ),
    ),
}


def _data(n: int) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, 6, generator=torch.Generator().manual_seed(n))}


def _syncs_of_fit(case: str, steps: int, batch_size: int, accumulate: int) -> list[str]:
    make_model, make_strategy = CASES[case]
    engine = Engine(
        make_strategy(),
        EngineConfig(
            epochs=1,
            batch_size=batch_size,
            accumulate_steps=accumulate,
            log_every=10_000,
            output_dir=None,
            device="cpu",
        ),
    )
    torch.manual_seed(0)
    model = make_model()
    with counting_syncs() as counter:
        engine.fit(model, _data(steps * batch_size))
    return counter.calls


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=4, deadline=None)
@given(
    steps=st.integers(min_value=1, max_value=6),
    batch_size=st.integers(min_value=1, max_value=8),
    accumulate=st.integers(min_value=1, max_value=3),
)
def test_fit_syncs_do_not_grow_with_steps(
    case: str, steps: int, batch_size: int, accumulate: int
) -> None:
    """Doubling the steps of a run adds no host read: the loop, the data path and the strategy
    read nothing per step (what is left is per log interval and per epoch)."""
    short = _syncs_of_fit(case, steps, batch_size, accumulate)
    long = _syncs_of_fit(case, 2 * steps, batch_size, accumulate)
    assert len(long) == len(short), (
        f"{case}: {len(short)} reads for {steps} steps: {short}; "
        f"{len(long)} for {2 * steps}: {long}"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_makes_no_host_read(case: str) -> None:
    make_model, make_strategy = CASES[case]
    torch.manual_seed(0)
    model, strategy = make_model(), make_strategy()
    device = torch.device("cpu")
    ctx = StepContext(
        device=device,
        precision="fp32",
        autocast=autocast_factory(device, "fp32"),
        scaler=None,
        grad_clip_norm=1.0,
        nonfinite="raise",
        progress=Progress(),
        world=World(),
    )
    strategy.setup(model, ctx)
    batch = _data(8)
    strategy.train_step(model, batch, ctx)  # first step: lazy optimiser state is built
    with counting_syncs() as counter:
        for _ in range(3):
            metrics = strategy.train_step(model, batch, ctx)
    assert counter.calls == [], f"{case}: host reads in train_step: {counter.calls}"
    assert all(isinstance(value, torch.Tensor) for value in metrics.values())


def test_counter_sees_a_read_from_our_packages() -> None:
    """The instrument works: a strategy that reads its loss on the host is caught."""
    strategy = Standard(OptimizerSpec("SGD", lr=0.1))
    engine = Engine(strategy, EngineConfig(nonfinite="skip", output_dir=None, device="cpu"))
    with counting_syncs() as counter:
        engine.fit(TinyRegressor(6), _data(16))
    assert any("__bool__" in call for call in counter.calls), counter.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_cuda_fit_runs_under_sync_debug_error_between_intervals() -> None:
    """On CUDA, torch itself raises on any synchronising call inside the steps of an interval."""
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        EngineConfig(epochs=1, batch_size=8, log_every=10_000, output_dir=None, device="cuda"),
    )
    model = TinyRegressor(6).cuda()
    calls: list[int] = []

    def strict(run: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")
        calls.append(run.progress.step)

    def relaxed(run: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")

    engine.on(Event.BATCH_START, strict)
    engine.on(Event.BATCH_END, relaxed)
    try:
        engine.fit(model, _data(64))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 8

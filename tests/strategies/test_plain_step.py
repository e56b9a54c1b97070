"""The plain step (``strategies/update.py``'s ``is_plain_step``): where a window of one batch
asks for nothing but the backwards and the optimiser steps (one process, no scaler, no
clipping, no per-step scheduler, ``nonfinite`` not ``"skip"``, not ``compile="step"``),
``Standard`` calls the backward and the step directly and a multi-role strategy reads, backs
up and steps its active updates in one function (``strategies/joint.py``'s ``_train_plain``).
Either trains (and logs) to the same bits as the full path, and every setting that needs more
takes the full path (``JointUpdates.read``/``train``, ``backward_isolated``,
``apply_updates``).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig, OptimizerSpec, SchedulerSpec
from strategies import CoupledAdversarial, Standard
from tests.engine.checkpoint_cases import FEATURES, data, equal, make_case, without_seconds
from tests.engine.test_compile_step import StepToy
from tests.helpers import TinyRegressor, same_tensors, snapshot

UPDATE = Path(__file__).resolve().parents[2] / "strategies" / "update.py"
JOINT = UPDATE.with_name("joint.py")
FULL_PATH = ("backward_isolated", "apply_updates")


def _fit(seed: int, strategy: Standard, steps: int = 6, **config: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyRegressor()
    samples = torch.randn(4 * steps, 4, generator=torch.Generator().manual_seed(seed))
    config = {"batch_size": 4, "shuffle": False, "output_dir": None, "device": "cpu", **config}
    Engine(strategy, EngineConfig(**config)).fit(model, samples)
    return snapshot(model)


def _full_path_calls(strategy: Standard, steps: int, **config: Any) -> Counter[str]:
    """How often a fit of ``steps`` batches called the full path's functions."""
    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name in FULL_PATH and Path(code.co_filename) == UPDATE:
            counts[code.co_name] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        _fit(0, strategy, steps, **config)
    finally:
        sys.setprofile(previous)
    return counts


def _sgd() -> Standard:
    return Standard(OptimizerSpec("SGD", lr=0.1))


def test_a_plain_step_calls_backward_and_step_directly() -> None:
    assert _full_path_calls(_sgd(), steps=6) == Counter()


@pytest.mark.parametrize(
    ("needs", "strategy", "config"),
    [
        ("clipping", _sgd(), {"grad_clip_norm": 1.0}),
        ("a role's clipping", Standard(OptimizerSpec("SGD", lr=0.1), grad_clip_norm=1.0), {}),
        (
            "a per-step scheduler",
            Standard(
                OptimizerSpec("SGD", lr=0.1),
                scheduler=SchedulerSpec("StepLR", interval="step", step_size=2),
            ),
            {},
        ),
        ("the finiteness check", _sgd(), {"nonfinite": "skip"}),
        ("accumulation", _sgd(), {"accumulate_steps": 2}),
    ],
)
def test_a_setting_that_needs_more_takes_the_full_path(
    needs: str, strategy: Standard, config: dict[str, Any]
) -> None:
    calls = _full_path_calls(strategy, steps=6, **config)
    assert calls["backward_isolated"] >= 6 and calls["apply_updates"] >= 6, (needs, calls)


def test_a_per_epoch_scheduler_keeps_the_plain_step() -> None:
    spec = SchedulerSpec("StepLR", interval="epoch", step_size=1)
    assert _full_path_calls(Standard(OptimizerSpec("SGD", lr=0.1), scheduler=spec), 6) == {}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 1000),
    optimizer=st.sampled_from(["SGD", "Adam", "AdamW", "RMSprop"]),
    lr=st.sampled_from([1e-3, 1e-2, 0.1]),
)
def test_the_plain_step_trains_to_the_full_paths_bits(seed: int, optimizer: str, lr: float) -> None:
    """``nonfinite="skip"`` takes the full path and, on finite losses, only reads them: the
    same arithmetic, so the same parameters to the bit."""
    plain = _fit(seed, Standard(OptimizerSpec(optimizer, lr=lr)))
    full = _fit(seed, Standard(OptimizerSpec(optimizer, lr=lr)), nonfinite="skip")
    assert same_tensors(plain, full)
    torch.manual_seed(seed)
    assert not same_tensors(plain, snapshot(TinyRegressor())), "nothing trained"


def _fit_case(
    kind: str, seed: int, flags: bool, n_critic: int = 1, **config: Any
) -> dict[str, Any]:
    toy = (lambda: StepToy(device_flags=True)) if flags else None
    model, strategy = make_case(kind, seed=seed, n_critic=n_critic, toy=toy)
    config = {"batch_size": 8, "shuffle": False, "output_dir": None, "device": "cpu", **config}
    Engine(strategy, EngineConfig(**config)).fit(model, data(40))
    return {"model": snapshot(model), "strategy": strategy.state_dict()}


@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["adversarial", "two_phase", "coupled", "coupled_adversarial"]),
    seed=st.integers(0, 1000),
    flags=st.booleans(),
    n_critic=st.sampled_from([1, 2]),
)
def test_a_multi_role_plain_step_trains_to_the_full_paths_bits(
    kind: str, seed: int, flags: bool, n_critic: int
) -> None:
    """With ``flags``, the forward switches updates off in some steps (``StepToy``): an update
    that is off is stepped by neither path. ``n_critic=2`` puts the generator on a schedule
    (and, two-phase, leaves its forward out of the discriminator's windows)."""
    if kind not in ("adversarial", "two_phase"):
        n_critic = 1
    plain = _fit_case(kind, seed, flags, n_critic)
    assert equal(plain, _fit_case(kind, seed, flags, n_critic, nonfinite="skip"))


class SharingToy(nn.Module):
    """Three roles' losses (each reaching every group) where some roles train on the very same
    tensor, and ``update_<role>`` flags as absent, Python bools or bool tensors."""

    def __init__(self, share: str, flags: str) -> None:
        super().__init__()
        self.share, self.flags = share, flags
        self.encoder = nn.Linear(FEATURES, 2)
        self.decoder = nn.Linear(2, FEATURES)
        self.discriminator = nn.Linear(FEATURES, 1)

    def forward(self, batch: Any, **_: Any) -> dict[str, Any]:
        x = batch["data"]
        z = torch.tanh(self.encoder(x))
        recon = self.decoder(z)
        recon_loss = (recon - x).pow(2).mean()
        fake, real = self.discriminator(recon).pow(2).mean(), self.discriminator(x).mean()
        losses = {
            "encoder_loss": recon_loss + 0.2 * z.pow(2).mean() + 0.1 * fake,
            "decoder_loss": recon_loss - 0.4 * fake,
            "discriminator_loss": fake - 0.5 * real + 0.1 * z.pow(2).mean(),
        }
        if self.share == "adjacent":  # pythae's RAE-L2: encoder and decoder on one tensor
            losses["decoder_loss"] = losses["encoder_loss"]
        elif self.share == "apart":  # the first and the last role on one tensor
            losses["discriminator_loss"] = losses["encoder_loss"]
        elif self.share == "all":
            losses["decoder_loss"] = losses["discriminator_loss"] = losses["encoder_loss"]
        outputs: dict[str, Any] = {**losses, "recon_loss": recon_loss}
        decoder_on, discriminator_on = x[:, 0].mean() > 0, x[:, 1].mean() < 0.3
        if self.flags == "bool":
            outputs["update_decoder"] = bool(decoder_on)
            outputs["update_discriminator"] = bool(discriminator_on)
        elif self.flags == "tensor":
            outputs["update_decoder"], outputs["update_discriminator"] = (
                decoder_on,
                discriminator_on,
            )
        return outputs


def _fit_sharing(seed: int, share: str, flags: str, **config: Any) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = SharingToy(share, flags)
    adam, sgd = OptimizerSpec("Adam", lr=1e-2), OptimizerSpec("SGD", lr=1e-2, momentum=0.9)
    strategy = CoupledAdversarial(
        encoder=adam, decoder=adam, discriminator=sgd, metrics=("recon_loss",)
    )
    config = {"batch_size": 8, "shuffle": False, "output_dir": None, "device": "cpu", **config}
    result = Engine(strategy, EngineConfig(epochs=2, **config)).fit(model, data(40))
    return {
        "model": snapshot(model),
        "strategy": strategy.state_dict(),
        "history": without_seconds(result.history),
    }


@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 1000),
    share=st.sampled_from(["none", "adjacent", "apart", "all"]),
    flags=st.sampled_from(["absent", "bool", "tensor"]),
)
def test_a_plain_step_over_shared_losses_trains_and_logs_as_the_full_path(
    seed: int, share: str, flags: str
) -> None:
    """Roles that train on one loss tensor share one backward (into the union of their groups;
    into everything when all of them share it and all are on), in both paths; the logged
    metrics (each loss once per key, the extra ``recon_loss``) are the same too."""
    plain = _fit_sharing(seed, share, flags)
    assert equal(plain, _fit_sharing(seed, share, flags, nonfinite="skip"))
    torch.manual_seed(seed)
    assert not same_tensors(plain["model"], snapshot(SharingToy(share, flags))), "nothing trained"


def test_a_multi_role_step_takes_the_full_path_only_when_asked() -> None:
    """A plain step runs ``_train_plain`` alone: none of the full path's ``RoleStep`` reading,
    ``JointUpdates.train`` or ``apply_updates``; clipping takes the full path every step."""
    model, strategy = make_case("coupled_adversarial", seed=0)
    counts: Counter[str] = Counter()
    watched = {UPDATE: ("apply_updates",), JOINT: ("_train_plain", "read", "train")}

    def profile(frame: FrameType, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name in watched.get(Path(code.co_filename), ()):
            counts[code.co_name] += 1

    for clip, plain, full in ((None, 5, 0), (1.0, 0, 5)):
        counts.clear()
        config = EngineConfig(batch_size=8, output_dir=None, device="cpu", grad_clip_norm=clip)
        engine = Engine(strategy, config)
        sys.setprofile(profile)
        try:
            engine.fit(model, data(40))
        finally:
            sys.setprofile(None)
        expected = {"_train_plain": plain, "read": full, "train": full, "apply_updates": full}
        assert counts == Counter({k: v for k, v in expected.items() if v}), (clip, counts)

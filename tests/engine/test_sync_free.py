"""No host-device synchronisation per training step, for every strategy.

Host reads are counted at their source by ``tests/engine/host_reads.py`` (an aten dispatch
mode, which sees every op whoever runs it, plus the Python calls that are no-ops on the CPU).
Inside a step (BATCH_START to BATCH_END: the strategy's ``train_step`` and the loop's own
bookkeeping) nothing may be read on the host; over a whole fit, twice the steps must read
nothing more (what is read happens at the log interval and at the epoch's end). The one
documented exception: update flags a forward returns as device tensors (VAEGAN's equilibrium
rule) are read once each per step on the CPU, all of a step's in one transfer on an
accelerator. On CUDA, torch's own sync debug mode checks the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig, Event, OptimizerSpec
from strategies import Standard
from tests.engine.host_reads import counting_host_reads
from tests.helpers import TinyRegressor
from tests.strategies.builders import ALL_KINDS, build
from tests.strategies.toy import CoupledToy

FEATURES = 3


def _specs() -> dict[str, OptimizerSpec]:
    return {
        "generator": OptimizerSpec("Adam", lr=1e-2),
        "discriminator": OptimizerSpec("SGD", lr=1e-2, momentum=0.9),
        "encoder": OptimizerSpec("Adam", lr=1e-2),
        "decoder": OptimizerSpec("AdamW", lr=1e-2),
    }


def _case(kind: str) -> tuple[nn.Module, Any]:
    """A fresh model and strategy; the adversarial kinds alternate (n_critic=2), so that both
    generator windows and discriminator-only windows run."""
    torch.manual_seed(0)
    if kind == "standard":
        return TinyRegressor(FEATURES), Standard(OptimizerSpec("Adam", lr=1e-2))
    options = {"n_critic": 2} if kind in ("adversarial", "two_phase", "sequential") else {}
    case = build(kind, CoupledToy(features=FEATURES), _specs(), **options)
    return case.model, case.strategy


KINDS = ("standard", *ALL_KINDS)


def _data(n: int) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, FEATURES, generator=torch.Generator().manual_seed(n))}


def _config(batch_size: int = 4, accumulate: int = 1, clip: float | None = 1.0) -> EngineConfig:
    return EngineConfig(
        epochs=1,
        batch_size=batch_size,
        accumulate_steps=accumulate,
        grad_clip_norm=clip,
        log_every=10_000,
        output_dir=None,
        device="cpu",
    )


def _reads_inside_steps(
    model: nn.Module, strategy: Any, config: EngineConfig, data: Any
) -> tuple[list[str], int]:
    """Host reads between each BATCH_START and its BATCH_END over a fit; and the steps run."""
    engine = Engine(strategy, config)
    steps: list[int] = []

    def start(run: Any) -> None:
        reads.active = True

    def end(run: Any) -> None:
        reads.active = False
        steps.append(run.progress.step)

    engine.on(Event.BATCH_START, start)
    engine.on(Event.BATCH_END, end)
    with counting_host_reads() as reads:
        reads.active = False
        engine.fit(model, data)
    return reads.reads, len(steps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_training_step_reads_nothing_on_the_host(kind: str, accumulate: int) -> None:
    model, strategy = _case(kind)
    reads, steps = _reads_inside_steps(model, strategy, _config(accumulate=accumulate), _data(24))
    assert steps == 6
    assert reads == [], f"{kind}: host reads inside the steps: {reads}"


def _reads_of_fit(kind: str, steps: int, batch_size: int, accumulate: int) -> list[str]:
    """Host reads over a whole fit. A ``.to()`` that names the CPU is left out here (it counts
    inside steps): outside them the engine moves data, metrics and the model to the run's
    device, which on this machine is the CPU."""
    model, strategy = _case(kind)
    engine = Engine(strategy, _config(batch_size, accumulate))
    with counting_host_reads() as reads:
        engine.fit(model, _data(steps * batch_size))
    return [read for read in reads.reads if not read.startswith("Tensor.to ")]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=3, deadline=None)
@given(
    steps=st.integers(min_value=1, max_value=5),
    batch_size=st.integers(min_value=1, max_value=6),
    accumulate=st.integers(min_value=1, max_value=3),
)
def test_a_fit_with_twice_the_steps_reads_nothing_more(
    kind: str, steps: int, batch_size: int, accumulate: int
) -> None:
    """The loop, the data path and the strategy read nothing per step; what a fit reads
    (at its log intervals and epoch end, per metric) does not grow with the steps. Both runs
    cover at least two optimiser windows, so both log every metric (the generator of
    ``n_critic=2`` reports from its first window on)."""
    windows = 2 * steps
    short = _reads_of_fit(kind, windows * accumulate, batch_size, accumulate)
    long = _reads_of_fit(kind, 2 * windows * accumulate, batch_size, accumulate)
    assert len(long) == len(short), (
        f"{kind}: {len(short)} reads for {windows} windows: {short}; "
        f"{len(long)} for {2 * windows}: {long}"
    )


def test_update_flags_returned_as_device_tensors_are_read_once_each_per_step() -> None:
    """The documented exception: VAEGAN's equilibrium rule returns ``update_<role>`` as device
    tensors, which the strategy must read to decide which backwards to run (on the CPU one
    read each: no transfer; on an accelerator all in one, the CUDA test below)."""
    model, strategy = _case("coupled_adversarial")
    model.flags = {"update_decoder": torch.tensor(True), "update_discriminator": torch.tensor(True)}
    reads, steps = _reads_inside_steps(model, strategy, _config(), _data(24))
    assert len(reads) == 2 * steps, reads
    assert all(read.startswith("aten._local_scalar_dense") for read in reads), reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one transfer per step)")
def test_cuda_update_flags_are_read_in_one_transfer_per_step() -> None:
    """Three flags a step on the GPU: one synchronisation a step, not three."""
    model, strategy = _case("coupled_adversarial")
    model.flags = {
        f"update_{role}": torch.tensor(True, device="cuda")
        for role in ("encoder", "decoder", "discriminator")
    }
    config = EngineConfig(epochs=1, batch_size=4, log_every=10_000, output_dir=None, device="cuda")
    reads, steps = _reads_inside_steps(model, strategy, config, _data(24))
    assert len(reads) == steps, reads


HOST_READS: dict[str, Callable[[torch.Tensor], Any]] = {
    "item": lambda t: t.detach().item(),
    "bool": lambda t: bool(t > 0),
    "float": lambda t: float(t.detach()),
    "int": lambda t: int(t.detach()),
    "is_nonzero": lambda t: torch.is_nonzero(t),
    "if": lambda t: 1 if t > 0 else 0,
    "to_cpu": lambda t: t.detach().to("cpu"),
    "cpu": lambda t: t.detach().cpu(),
    "tolist": lambda t: t.detach().tolist(),
    "numpy": lambda t: t.detach().numpy(),
    "nonzero": lambda t: t.reshape(1).nonzero(),
    "boolean_mask": lambda t: t.reshape(1)[t.reshape(1) > 0],
    "masked_select": lambda t: t.reshape(1).masked_select(t.reshape(1) > 0),
    "unique": lambda t: t.reshape(1).unique(),
    "equal": lambda t: torch.equal(t, t),
}


class ReadsInForward(nn.Module):
    """A regressor whose forward makes one host read of its loss (``read``)."""

    def __init__(self, read: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.inner = TinyRegressor(FEATURES)
        self.read = read

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        out = self.inner(batch)
        self.read(out["loss"])
        return out


@pytest.mark.parametrize("name", sorted(HOST_READS))
def test_the_instrument_sees_each_kind_of_host_read_on_the_cpu(name: str) -> None:
    """Each way of reading a tensor on the host, made once per step inside a forward, is seen
    once per step (so the zero above means none of them happens)."""
    model = ReadsInForward(HOST_READS[name])
    strategy = Standard(OptimizerSpec("Adam", lr=1e-2))
    reads, steps = _reads_inside_steps(model, strategy, _config(), _data(24))
    assert len(reads) == steps == 6, reads
    assert all("test_sync_free.py" in read for read in reads), reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_fit_runs_under_sync_debug_error_between_intervals(kind: str) -> None:
    """On CUDA, torch itself raises on any synchronising call inside the steps."""
    model, strategy = _case(kind)
    engine = Engine(
        strategy,
        EngineConfig(epochs=1, batch_size=8, log_every=10_000, output_dir=None, device="cuda"),
    )
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

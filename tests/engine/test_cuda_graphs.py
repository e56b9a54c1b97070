"""CUDA graphs for ``compile="step"`` (``mode="reduce-overhead"``): on a GPU, without gradient
accumulation, the compiled step is captured and replayed; it trains as eager does, its metrics
survive later replays (they are copied out of the graphs' memory pool), and with accumulation
no graph is captured (an accumulated gradient would live in the pool a replay overwrites).

The decision is tested everywhere; what needs a GPU skips on a machine without one, naming the
reason. On a GPU machine: ``python -m pytest -q tests/engine/test_cuda_graphs.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from engine import Engine, EngineConfig
from engine.hardware.compiling import cuda_graphs_apply, recompile_count
from tests.engine.test_compile_step import step_case

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA graphs capture GPU kernels: torch.cuda.is_available() is False on this machine",
)


def test_graphs_are_captured_on_cuda_without_accumulation_only() -> None:
    assert cuda_graphs_apply(torch.device("cuda", 0), accumulate_steps=1)
    assert not cuda_graphs_apply(torch.device("cuda", 0), accumulate_steps=2)
    assert not cuda_graphs_apply(torch.device("cpu"), accumulate_steps=1)


def _train(kind: str, compile: Any, accumulate: int = 1) -> tuple[dict[str, Any], list[float]]:
    model, strategy = step_case(kind)
    config = EngineConfig(
        epochs=2,
        batch_size=8,
        shuffle=False,
        device="cuda",
        output_dir=None,
        compile=compile,
        accumulate_steps=accumulate,
        log_every=1000,  # every metric of an epoch is buffered across many replays
    )
    data = {"data": torch.randn(37, 3, generator=torch.Generator().manual_seed(7))}
    result = Engine(strategy, config).fit(model, data)
    losses = [record[f"train/{strategy.loss_keys[0]}"] for record in result.history]
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    return state, losses


@needs_cuda
@pytest.mark.parametrize("kind", ["standard", "coupled", "adversarial"])
def test_a_graphed_step_trains_like_eager(kind: str, fresh_dynamo: None) -> None:
    graphed, graphed_losses = _train(kind, "step")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert recompile_count() <= (4 if kind == "adversarial" else 1)
    eager, eager_losses = _train(kind, False)
    for key, value in eager.items():
        torch.testing.assert_close(graphed[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the epoch means read metrics buffered over many replays: copies, not the pool
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-4, atol=1e-6)


@needs_cuda
def test_with_accumulation_the_compiled_step_is_not_graphed(fresh_dynamo: None) -> None:
    compiled, _ = _train("standard", "step", accumulate=2)
    eager, _ = _train("standard", False, accumulate=2)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)

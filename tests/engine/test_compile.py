"""``EngineConfig(compile=True)``: every strategy trains a compiled model as it trains the eager
one, including the multi-loss strategies that back-propagate twice through one compiled graph,
and a short last batch (a recompilation for a new shape, whose backward is compiled late)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from engine import Engine, EngineConfig, OptimizerSpec
from strategies import Standard
from tests.engine.checkpoint_cases import FEATURES, KINDS, data, make_case


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, FEATURES))

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.layers(x) - x.flip(-1)).pow(2).mean()}


def _case(kind: str) -> tuple[nn.Module, Any]:
    if kind == "standard":  # the shared case has dropout, whose compiled RNG differs from eager
        torch.manual_seed(0)
        return Regressor(), Standard(OptimizerSpec("Adam", lr=1e-2))
    return make_case(kind, seed=0, n_critic=2)


def _train(kind: str, compile: bool) -> dict[str, torch.Tensor]:
    model, strategy = _case(kind)
    config = EngineConfig(
        epochs=2, batch_size=8, shuffle=False, device="cpu", output_dir=None, compile=compile
    )
    Engine(strategy, config).fit(model, data(37))  # 4 batches of 8, then one of 5
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_compiled_model_trains_like_the_eager_one(kind: str, inductor: None) -> None:
    torch._dynamo.reset()
    counters.clear()
    compiled = _train(kind, compile=True)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    eager = _train(kind, compile=False)
    assert compiled.keys() == eager.keys()  # the original's names, not "_orig_mod." ones
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)

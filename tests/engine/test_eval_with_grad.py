"""``EngineConfig(eval_with_grad=True)``: evaluation of models whose loss calls
``torch.autograd.grad`` (gradient penalties, HMC steps), still changing no training state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig, ModelOutputError, OptimizerSpec
from strategies import Standard


class PenalisedRegressor(nn.Module):
    """A loss with a gradient penalty on the input (as RAE_GP); input noise in every mode (as a
    VAE's sampling) so that the RNG stream matters; BatchNorm so that buffers and the mode
    matter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 4)
        )

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = (batch["data"] + 0.01 * torch.randn_like(batch["data"])).requires_grad_(True)
        out = self.net(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=self.training)
        return {"loss": (out - batch["data"]).pow(2).mean() + grad.pow(2).mean()}


def _engine(eval_with_grad: bool, seed: int = 0) -> Engine:
    config = EngineConfig(
        epochs=1, batch_size=8, output_dir=None, seed=seed, eval_with_grad=eval_with_grad
    )
    return Engine(Standard(OptimizerSpec("Adam", lr=1e-2)), config)


def _data(n: int = 32) -> dict[str, torch.Tensor]:
    return {"data": torch.randn(n, 4, generator=torch.Generator().manual_seed(1))}


def test_without_it_the_error_names_the_setting() -> None:
    torch.manual_seed(0)
    engine, model = _engine(False), PenalisedRegressor()
    with pytest.raises(ModelOutputError, match=r"eval_with_grad=True"):
        engine.fit(model, _data(), eval=_data(16))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_evaluation_with_grad_changes_no_training_state(seed: int) -> None:
    """Parameters, their .grad, BatchNorm buffers, optimiser state, the RNG stream and the
    training mode are the same before and after an evaluation with gradients on."""
    torch.manual_seed(seed)
    engine, model = _engine(True, seed), PenalisedRegressor()
    engine.fit(model, _data())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    optimiser = repr(engine.strategy.state_dict())
    rng = torch.get_rng_state()
    metrics = engine.evaluate(model, _data(16))
    assert set(metrics) == {"loss"} and torch.isfinite(torch.tensor(metrics["loss"]))
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert repr(engine.strategy.state_dict()) == optimiser
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for param, grad in zip(model.parameters(), grads):
        assert (param.grad is None and grad is None) or torch.equal(param.grad, grad)


def test_fit_with_eval_with_grad_reports_eval_losses() -> None:
    torch.manual_seed(0)
    result = _engine(True).fit(PenalisedRegressor(), _data(), eval=_data(16))
    assert "eval/loss" in result.history[-1]

"""Reading data never draws from the global random stream: a map-style ``Dataset`` trains a
model whose forward draws noise exactly as the same tensors do (a ``DataLoader`` without its
own generator takes one draw per epoch from the global stream)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from engine import Engine, EngineConfig, OptimizerSpec
from strategies import Standard


class NoisyRegressor(torch.nn.Module):
    """Draws noise in every forward, so its trajectory depends on the global RNG stream."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.linear(x + torch.randn_like(x)) - x).pow(2).mean()}


class Samples(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"data": self.data[index]}


def _train(data: Any, seed: int, epochs: int) -> torch.Tensor:
    config = EngineConfig(epochs=epochs, batch_size=8, output_dir=None, seed=seed)
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.1)), config)
    torch.manual_seed(seed)
    model = NoisyRegressor()
    engine.fit(model, data)
    return model.linear.weight.detach().clone()


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1000), n=st.integers(8, 40), epochs=st.integers(2, 3))
def test_a_dataset_trains_exactly_like_its_tensors(seed: int, n: int, epochs: int) -> None:
    data = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    as_tensors = _train({"data": data}, seed, epochs)
    as_dataset = _train(Samples(data), seed, epochs)
    assert torch.equal(as_tensors, as_dataset)

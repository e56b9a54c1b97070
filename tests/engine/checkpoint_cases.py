"""Runs to compare in the resume tests: every strategy over a tiny model, and deep equality."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from engine.config.specs import OptimizerSpec
from strategies import Standard
from tests.strategies.builders import build
from tests.strategies.toy import CoupledToy

KINDS = ("standard", "adversarial", "two_phase", "sequential", "coupled", "coupled_adversarial")
FEATURES = 3


class DropoutRegressor(nn.Module):
    """``loss`` of a linear map behind dropout: training draws from the torch RNG each step."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.dropout = nn.Dropout(0.3)
        self.config = {"features": FEATURES}

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.dropout(self.linear(x)) - x.flip(-1)).pow(2).mean()}


def make_case(
    kind: str, seed: int, n_critic: int = 1, toy: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, Any]:
    """A fresh model (initialised from ``seed``) and strategy of ``kind``; the multi-role
    kinds train ``toy()`` (default: ``CoupledToy``), a model with their roles' losses."""
    torch.manual_seed(seed)
    if kind == "standard":
        return DropoutRegressor(), Standard(OptimizerSpec("Adam", lr=1e-2))
    specs = {
        role: OptimizerSpec("Adam", lr=1e-2)
        if role != "discriminator"
        else OptimizerSpec("SGD", lr=1e-2, momentum=0.9)
        for role in ("generator", "discriminator", "encoder", "decoder")
    }
    options = {"n_critic": n_critic} if kind in ("adversarial", "two_phase", "sequential") else {}
    model = toy() if toy is not None else CoupledToy(features=FEATURES)
    case = build(kind, model, specs, **options)  # type: ignore[arg-type]
    return case.model, case.strategy


def data(n: int) -> dict[str, torch.Tensor]:
    return {"data": torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(7))}


def without_seconds(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per-epoch records without their wall-clock time, the one field that never repeats."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def equal(a: Any, b: Any) -> bool:
    """Bitwise deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return bool(a == b)

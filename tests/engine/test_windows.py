"""Accumulation windows: every batch placed once, short last windows stepped, streams of unknown
length trained exactly like the same data as tensors."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import IterableDataset

import strategies
from engine import Engine, EngineConfig, OptimizerSpec, World
from engine.data.windows import in_windows


def _windows(placed: list[tuple[Any, int, int]]) -> list[list[Any]]:
    """Split ``placed`` where each window starts (``micro_index == 0``), checking on the way
    that indices count up from 0 and that every batch of a window names its size."""
    windows: list[list[Any]] = []
    sizes: list[int] = []
    for batch, index, count in placed:
        if index == 0:
            windows.append([])
            sizes.append(count)
        assert index == len(windows[-1]), placed
        assert count == sizes[-1], placed
        windows[-1].append(batch)
    assert [len(window) for window in windows] == sizes, placed
    return windows


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 40), k=st.integers(1, 6), cap=st.none() | st.integers(1, 45))
def test_every_batch_is_placed_once_and_windows_are_k_long_but_the_last(
    n: int, k: int, cap: int | None
) -> None:
    total = n if cap is None else min(n, cap)
    known = list(in_windows(iter(range(n)), 0, total, cap, k, World()))
    unknown = list(in_windows(iter(range(n)), 0, None, cap, k, World()))
    assert known == unknown  # reading ahead gives the places arithmetic gives
    assert [batch for batch, _, _ in unknown] == list(range(total))
    windows = _windows(unknown)
    assert all(len(window) == k for window in windows[:-1])
    assert not windows or 1 <= len(windows[-1]) <= k


@settings(max_examples=100, deadline=None)
@given(start_window=st.integers(0, 5), k=st.integers(1, 5), n=st.integers(0, 30))
def test_a_restart_at_a_window_boundary_continues_the_same_places(
    start_window: int, k: int, n: int
) -> None:
    start = min(start_window * k, n)
    whole = list(in_windows(iter(range(n)), 0, None, None, k, World()))
    rest = list(in_windows(iter(range(start, n)), start, None, None, k, World()))
    assert rest == whole[start:]


def test_reading_ahead_takes_no_more_than_one_window() -> None:
    taken: list[int] = []

    def stream() -> Any:
        for value in range(100):
            taken.append(value)
            yield value

    placed = in_windows(stream(), 0, None, None, 4, World())
    assert next(placed) == (0, 0, 4)
    assert taken == [0, 1, 2, 3]


class Stream(IterableDataset):  # type: ignore[type-arg]
    """Rows of ``data`` in order, with no length."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __iter__(self) -> Any:
        rows = len(self.data["x"])
        return ({key: value[i] for key, value in self.data.items()} for i in range(rows))


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        return {"loss": (self.layer(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()}


def _train(data: Any, seed: int, **config: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Regressor()
    settings = EngineConfig(device="cpu", output_dir=None, shuffle=False, log_every=1, **config)
    result = Engine(strategies.Standard(OptimizerSpec("SGD", lr=0.1)), settings).fit(model, data)
    return {"steps": torch.tensor(result.steps), **model.state_dict()}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    batch_size=st.integers(1, 6),
    k=st.integers(1, 4),
    epochs=st.integers(1, 2),
    max_steps=st.none() | st.integers(1, 12),
    seed=st.integers(0, 50),
)
def test_a_stream_of_unknown_length_trains_exactly_like_the_same_tensors(
    n: int, batch_size: int, k: int, epochs: int, max_steps: int | None, seed: int
) -> None:
    """Short last windows of an ``IterableDataset`` (at the epoch's end or at ``max_steps``)
    are stepped with their own size as divisor, as they are for tensors."""
    generator = torch.Generator().manual_seed(seed)
    data = {"x": torch.randn(n, 3, generator=generator), "y": torch.randn(n, generator=generator)}
    config = {"batch_size": batch_size, "accumulate_steps": k, "epochs": epochs}
    config["max_steps"] = max_steps
    from_stream = _train(Stream(data), seed, **config)
    from_tensors = _train(data, seed, **config)
    assert from_stream.keys() == from_tensors.keys()
    for key, value in from_tensors.items():
        torch.testing.assert_close(from_stream[key], value, rtol=1e-6, atol=1e-7)

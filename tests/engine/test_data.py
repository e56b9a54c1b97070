"""Batching: every sample once per epoch, the right number of steps, every input type."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from engine import DataError, World
from engine.data.batches import make_batches


def _batches(data: object, **overrides: object):  # type: ignore[no-untyped-def]
    options = dict(
        name="training",
        batch_size=4,
        shuffle=True,
        drop_last=False,
        seed=0,
        device=torch.device("cpu"),
        world=World(),
    )
    options.update(overrides)
    return make_batches(data, **options)  # type: ignore[arg-type]


def _ids(batch: object) -> list[int]:
    tensor = batch["id"] if isinstance(batch, dict) else batch
    if isinstance(tensor, (list, tuple)):
        tensor = tensor[0]
    return [int(v) for v in tensor.reshape(-1)]  # type: ignore[union-attr]


class MapDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor(index)}


class Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(self.n))


KINDS = ["tensor", "dict", "tensordataset", "dataset"]


def _make(kind: str, n: int) -> object:
    ids = torch.arange(n)
    return {
        "tensor": ids,
        "dict": {"id": ids, "x": torch.randn(n, 3)},
        "tensordataset": TensorDataset(ids, torch.randn(n, 2)),
        "dataset": MapDataset(n),
    }[kind]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 70),
    batch_size=st.integers(1, 80),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    epoch=st.integers(0, 5),
)
def test_every_sample_once_per_epoch(
    kind: str, n: int, batch_size: int, shuffle: bool, drop_last: bool, epoch: int
) -> None:
    if drop_last and batch_size > n:
        with pytest.raises(DataError, match="no batches"):
            _batches(_make(kind, n), batch_size=batch_size, drop_last=True)
        return
    batches = _batches(_make(kind, n), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    seen = [_ids(batch) for batch in batches.epoch(epoch)]
    expected_steps = n // batch_size if drop_last else -(-n // batch_size)
    assert len(seen) == expected_steps == len(batches)
    flat = [i for ids in seen for i in ids]
    assert len(flat) == len(set(flat))
    assert len(flat) == (expected_steps * batch_size if drop_last else n)
    assert all(len(ids) == batch_size for ids in seen[:-1])
    if not shuffle:
        assert flat == sorted(flat)


@given(n=st.integers(2, 60), epoch=st.integers(0, 20))
def test_shuffle_is_reproducible_and_changes_per_epoch(n: int, epoch: int) -> None:
    first = [_ids(b) for b in _batches(torch.arange(n), batch_size=n).epoch(epoch)]
    again = [_ids(b) for b in _batches(torch.arange(n), batch_size=n).epoch(epoch)]
    assert first == again
    if n >= 8:
        other = [_ids(b) for b in _batches(torch.arange(n), batch_size=n).epoch(epoch + 1)]
        assert other != first


@given(n=st.integers(1, 50), batch_size=st.integers(1, 9), start=st.integers(0, 12))
def test_restart_inside_an_epoch_continues_the_same_order(
    n: int, batch_size: int, start: int
) -> None:
    batches = _batches(torch.arange(n), batch_size=batch_size)
    full = [_ids(b) for b in batches.epoch(3)]
    assert [_ids(b) for b in batches.epoch(3, start=start)] == full[start:]


@pytest.mark.parametrize("limit", [None, 0], ids=["shuffled copy", "gathered per batch"])
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 50),
    batch_size=st.integers(1, 9),
    start=st.integers(0, 12),
    epoch=st.integers(0, 3),
)
def test_both_in_memory_paths_give_the_same_batches_and_restart_where_asked(
    limit: int | None, n: int, batch_size: int, start: int, epoch: int
) -> None:
    """In-memory data above a size limit (512 MiB) is gathered batch by batch instead of from
    a shuffled copy; the limit is lowered to 0 here to take that path with small data. Both
    give the same batches, and a restart inside an epoch (a mid-epoch resume) continues with
    the batch it was asked for, replaying none."""
    data = {"id": torch.arange(n), "x": torch.randn(n, 2)}
    copied = [_ids(b) for b in _batches(data, batch_size=batch_size).epoch(epoch)]
    with pytest.MonkeyPatch.context() as patch:
        if limit is not None:
            patch.setattr("engine.data.batches._SHUFFLED_COPY_LIMIT", limit)
        batches = _batches(data, batch_size=batch_size)
        full = [_ids(b) for b in batches.epoch(epoch)]
        restarted = [_ids(b) for b in batches.epoch(epoch, start=start)]
    assert full == copied
    assert restarted == full[start:]


def test_same_order_on_the_fast_path_and_the_dataset_path() -> None:
    fast = [_ids(b) for b in _batches(torch.arange(23), batch_size=5).epoch(2)]
    loader = [_ids(b) for b in _batches(MapDataset(23), batch_size=5).epoch(2)]
    assert fast == loader


def test_iterable_dataset_and_ready_loader() -> None:
    stream = _batches(Stream(10), batch_size=4)
    assert [len(_ids(b)) for b in stream.epoch(0)] == [4, 4, 2]
    loader = _batches(DataLoader(TensorDataset(torch.arange(9)), batch_size=3))
    assert [_ids(b) for b in loader.epoch(0)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_fast_path_batches_are_whole_slices_of_the_input_structure() -> None:
    data = {"data": torch.randn(10, 1, 4, 4), "labels": torch.arange(10)}
    batch = next(iter(_batches(data, batch_size=4, shuffle=False).epoch(0)))
    assert set(batch) == {"data", "labels"}
    assert torch.equal(batch["data"], data["data"][:4])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.empty(0, 3), "empty"),
        ({"a": torch.zeros(3), "b": torch.zeros(4)}, "disagree"),
        (torch.tensor(1.0), "0-d"),
        (MapDataset(0), "empty"),
        ({}, "no tensors"),
        ({"a": [1, 2]}, "not a tensor"),
        ("not data", "str"),
        (DataLoader(TensorDataset(torch.zeros(0)), batch_size=2), "no batches"),
    ],
)
def test_bad_data_is_a_clear_error(data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _batches(data)


@given(n=st.integers(1, 50), batch_size=st.integers(1, 8), world_size=st.integers(1, 4))
def test_ranks_split_every_global_batch(n: int, batch_size: int, world_size: int) -> None:
    from engine.data.batches import batch_bounds

    per_rank = [
        batch_bounds(n, batch_size, False, World(rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(bounds) for bounds in per_rank}) == 1
    covered = sorted(i for bounds in per_rank for lo, hi in bounds for i in range(lo, hi))
    assert covered == list(range(n))

"""Device placement and one-batch-ahead prefetch (``engine/data/prefetch.py``).

The CUDA path is checked here on the CPU with the CUDA stream API mocked: what matters is the
order of operations (copy ``i + 1`` issued before batch ``i`` is used; the compute stream waits
on each batch's copy event, never the host). With a GPU, the real path runs as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.batches import make_batches
from engine.data.prefetch import fits_on_device, move_to_device, prefetch_to_device, tensors_of
from engine.distributed.collectives import World

CUDA = torch.device("cuda")


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=5), max_size=6))
def test_prefetch_off_cuda_yields_the_same_batches_in_order(sizes: list[int]) -> None:
    batches = [{"data": torch.full((n, 2), float(i)), "ids": [i]} for i, n in enumerate(sizes)]
    out = list(prefetch_to_device(iter(batches), torch.device("cpu")))
    assert len(out) == len(batches)
    for got, want in zip(out, batches):
        assert torch.equal(got["data"], want["data"]) and got["ids"] == want["ids"]


def test_move_to_device_keeps_structure_and_leaves_non_tensors() -> None:
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), "name"), "n": 3}
    moved = move_to_device(batch, torch.device("cpu"))
    assert isinstance(moved["pair"], tuple) and moved["pair"][1] == "name" and moved["n"] == 3
    assert len(tensors_of(moved)) == 2


class _CudaLog:
    """Mocks of the CUDA stream API that write what is called, in order, to ``log``."""

    def __init__(self) -> None:
        self.log: list[str] = []
        log = self.log
        self.compute = mock.MagicMock(name="compute")
        self.compute.wait_event.side_effect = lambda event: log.append(f"wait {event.tag}")
        self.copies = 0

        def make_event() -> Any:
            event = mock.MagicMock(name="event")
            event.tag = self.copies
            event.record.side_effect = lambda stream: log.append(f"copy {event.tag}")
            self.copies += 1
            return event

        self.patches = [
            mock.patch("torch.cuda.Stream", return_value=mock.MagicMock(name="copy_stream")),
            mock.patch("torch.cuda.current_stream", return_value=self.compute),
            mock.patch("torch.cuda.stream", return_value=mock.MagicMock()),
            mock.patch("torch.cuda.Event", side_effect=make_event),
        ]


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_cuda_prefetch_issues_the_next_copy_before_the_current_batch_is_used(count: int) -> None:
    cuda = _CudaLog()

    def source() -> Iterator[int]:
        for i in range(count):
            cuda.log.append(f"pull {i}")
            yield i  # not a tensor: move_to_device passes it through

    for patch in cuda.patches:
        patch.start()
    try:
        for batch in prefetch_to_device(source(), CUDA):
            cuda.log.append(f"use {batch}")
    finally:
        for patch in cuda.patches:
            patch.stop()
    for i in range(count):
        used = cuda.log.index(f"use {i}")
        assert cuda.log.index(f"copy {i}") < cuda.log.index(f"wait {i}") < used
        if i + 1 < count:
            assert cuda.log.index(f"copy {i + 1}") < used, cuda.log
    assert [entry for entry in cuda.log if entry.startswith("use")] == [
        f"use {i}" for i in range(count)
    ]


def test_fits_on_device_uses_half_the_free_cuda_memory() -> None:
    data = [torch.zeros(1000, dtype=torch.uint8)]
    assert fits_on_device(data, torch.device("cpu"))
    with mock.patch("torch.cuda.mem_get_info", return_value=(2000, 8000)):
        assert fits_on_device(data, CUDA)
    with mock.patch("torch.cuda.mem_get_info", return_value=(1999, 8000)):
        assert not fits_on_device(data, CUDA)


def test_data_kept_on_the_host_is_still_batched_in_the_same_order() -> None:
    data = {"data": torch.arange(10.0).unsqueeze(1)}
    kwargs: dict[str, Any] = dict(
        name="training",
        batch_size=3,
        shuffle=True,
        drop_last=False,
        seed=1,
        device=torch.device("cpu"),
        world=World(),
    )
    on = [b["data"] for b in make_batches(data, on_device=True, **kwargs).epoch(2)]
    off = [b["data"] for b in make_batches(data, on_device=False, **kwargs).epoch(2)]
    assert all(torch.equal(a, b) for a, b in zip(on, off)) and len(on) == len(off) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_data_reaches_the_gpu_pinned_and_prefetched() -> None:
    data = {"data": torch.arange(64.0).unsqueeze(1)}
    batches = make_batches(
        data,
        name="training",
        batch_size=8,
        shuffle=True,
        drop_last=False,
        seed=0,
        device=CUDA,
        world=World(),
        on_device=False,
    )
    assert batches.leaves[0].is_pinned()
    seen = torch.cat([b["data"] for b in batches.epoch(0)])
    assert seen.device.type == "cuda"
    assert sorted(seen.squeeze(1).tolist()) == list(range(64))

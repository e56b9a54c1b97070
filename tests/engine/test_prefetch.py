"""Device placement and one-batch-ahead prefetch (``engine/data/prefetch.py``).

The CUDA path is checked here on the CPU with the CUDA API replaced by a recording fake
(``FakeCuda``): streams and events log what is done to them, and a tensor's copy "to CUDA" is a
CPU clone that logs its ``non_blocking`` flag and whether it was issued on the side stream. What
matters is the order of operations (copy ``i + 1`` issued before batch ``i`` is used; the
compute stream waits on each batch's copy event, never the host), that every copy is
``non_blocking``, and that the host path (pinned host data, gathered and copied batch by batch)
gives the very batches the on-device path gives. With a GPU, the real path runs as well.
"""

from __future__ import annotations

import contextlib
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


class FakeCuda:
    """The CUDA API as ``prefetch.py`` uses it, recording into ``log`` in order: ``copy <b>``
    (an event recorded after batch b's copies), ``wait <b>`` (the compute stream waits on it),
    and per tensor moved to CUDA ``to non_blocking=<flag> side_stream=<flag>``."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.on_side_stream = False
        self.copies = 0
        self.compute = mock.MagicMock(name="compute stream")
        self.compute.wait_event.side_effect = lambda event: self.log.append(f"wait {event.tag}")
        self.moved: list[tuple[bool, bool]] = []  # (non_blocking, on the side stream)

    def event(self) -> Any:
        event = mock.MagicMock(name="event")
        event.tag = self.copies
        event.record.side_effect = lambda stream: self.log.append(f"copy {event.tag}")
        self.copies += 1
        return event

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        self.on_side_stream = True
        try:
            yield
        finally:
            self.on_side_stream = False

    def patches(self) -> list[Any]:
        original_to = torch.Tensor.to
        fake = self

        def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is None or device.type != "cuda":
                return original_to(tensor, *args, **kwargs)
            fake.moved.append((bool(kwargs.get("non_blocking", False)), fake.on_side_stream))
            return tensor.clone()  # stands for the copy on the GPU

        return [
            mock.patch("torch.cuda.Stream", return_value=mock.MagicMock(name="copy stream")),
            mock.patch("torch.cuda.current_stream", return_value=self.compute),
            mock.patch("torch.cuda.stream", side_effect=self.stream),
            mock.patch("torch.cuda.Event", side_effect=self.event),
            mock.patch("torch.cuda.mem_get_info", return_value=(0, 8 * 2**30)),
            mock.patch.object(torch.Tensor, "to", to),
            mock.patch.object(torch.Tensor, "record_stream", lambda tensor, stream: None),
            mock.patch.object(torch.Tensor, "pin_memory", lambda tensor, *a, **k: tensor),
            mock.patch.object(torch.Tensor, "is_pinned", lambda tensor, *a, **k: False),
        ]


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    fake = FakeCuda()
    with contextlib.ExitStack() as stack:
        for patch in fake.patches():
            stack.enter_context(patch)
        yield fake


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_cuda_prefetch_issues_the_next_copy_before_the_current_batch_is_used(count: int) -> None:
    def source(fake: FakeCuda) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(count):
            fake.log.append(f"pull {i}")
            yield {"data": torch.full((2, 3), float(i)), "index": torch.tensor([i, i])}

    with fake_cuda() as fake:
        for batch in prefetch_to_device(source(fake), CUDA):
            fake.log.append(f"use {int(batch['index'][0])}")
    for i in range(count):
        used = fake.log.index(f"use {i}")
        assert fake.log.index(f"copy {i}") < fake.log.index(f"wait {i}") < used
        if i + 1 < count:
            assert fake.log.index(f"copy {i + 1}") < used, fake.log
    assert [entry for entry in fake.log if entry.startswith("use")] == [
        f"use {i}" for i in range(count)
    ]
    # Every tensor of every batch was copied once, non_blocking, on the side stream.
    assert fake.moved == [(True, True)] * (2 * count)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 9),
    shuffle=st.booleans(),
    epoch=st.integers(0, 3),
    start=st.integers(0, 5),
)
def test_host_data_prefetched_to_cuda_gives_the_batches_of_the_on_device_path(
    n: int, batch_size: int, shuffle: bool, epoch: int, start: int
) -> None:
    """Data too large for the device (free memory faked to 0) stays on the host, pinned, and
    each batch is gathered there and copied ahead; the batches are those the on-device path
    (here: the CPU itself) cuts, in the same order, from any restart position."""
    data = {"data": torch.randn(n, 3), "index": torch.arange(n)}
    options: dict[str, Any] = dict(
        name="training",
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        seed=1,
        world=World(),
    )
    on_device = list(make_batches(data, device=torch.device("cpu"), **options).epoch(epoch, start))
    with fake_cuda() as fake:
        batches = make_batches(data, device=CUDA, **options)
        assert batches.leaves[0].device.type == "cpu"  # kept on the host
        prefetched = list(batches.epoch(epoch, start))
    assert len(prefetched) == len(on_device)
    for got, want in zip(prefetched, on_device):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want)
    assert fake.moved == [(True, True)] * (2 * len(on_device))


def test_fits_on_device_uses_half_the_free_cuda_memory() -> None:
    data = [torch.zeros(1000, dtype=torch.uint8)]
    assert fits_on_device(data, torch.device("cpu"))
    with mock.patch("torch.cuda.mem_get_info", return_value=(2000, 8000)):
        assert fits_on_device(data, CUDA)
    with mock.patch("torch.cuda.mem_get_info", return_value=(1999, 8000)):
        assert not fits_on_device(data, CUDA)


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

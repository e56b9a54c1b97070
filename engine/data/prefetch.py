"""Getting batches onto an accelerator without stalling it.

In-memory data goes to the device once, when it fits (``fits_on_device``: at most half of the
free device memory, leaving the rest to the model). Otherwise it stays on the host in pinned
memory, and ``prefetch_to_device`` copies each batch with ``non_blocking=True`` on a side CUDA
stream, one batch ahead: while batch ``i`` trains, batch ``i + 1`` is already in flight. The
compute stream waits on each batch's copy event just before using it, so nothing synchronises
the host. Off CUDA, batches are simply moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

# In-memory data is moved to a CUDA device once when it takes at most this share of free memory.
DEVICE_MEMORY_SHARE = 0.5


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors inside dicts, lists and tuples moved to ``device``; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, non_blocking) for value in batch)
    return batch


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor inside a batch of nested dicts, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in tensors_of(value)]
    if isinstance(batch, (list, tuple)):
        return [t for value in batch for t in tensors_of(value)]
    return []


def fits_on_device(tensors: Sequence[torch.Tensor], device: torch.device) -> bool:
    """Whether moving ``tensors`` to ``device`` once leaves room to train: always true off
    CUDA; on CUDA, at most ``DEVICE_MEMORY_SHARE`` of the device's free memory."""
    if device.type != "cuda":
        return True
    on_host = sum(t.numel() * t.element_size() for t in tensors if t.device != device)
    free, _total = torch.cuda.mem_get_info(device)
    return on_host <= DEVICE_MEMORY_SHARE * free


def pin(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors in pinned memory when they will be copied to a CUDA device."""
    if device.type != "cuda":
        return list(tensors)
    return [t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory() for t in tensors]


def prefetch_to_device(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """``batches`` moved to ``device``; on CUDA, each copy is issued one batch ahead."""
    if device.type != "cuda":
        for batch in batches:
            yield move_to_device(batch, device)
        return
    copy_stream = torch.cuda.Stream(device)
    pending: tuple[Any, Any] | None = None
    for batch in batches:
        issued = _issue(batch, device, copy_stream)
        if pending is not None:
            yield _ready(pending, device)
        pending = issued
    if pending is not None:
        yield _ready(pending, device)


def _issue(batch: Any, device: torch.device, copy_stream: Any) -> tuple[Any, Any]:
    """Start copying ``batch`` on the side stream; returns the moved batch and its event."""
    copy_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(copy_stream):
        moved = move_to_device(batch, device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copy_stream)
    return moved, done


def _ready(pending: tuple[Any, Any], device: torch.device) -> Any:
    """Make the compute stream wait for the copy (on the device, not the host), and tell the
    caching allocator the batch's memory is in use on the compute stream."""
    moved, done = pending
    compute = torch.cuda.current_stream(device)
    compute.wait_event(done)
    for tensor in tensors_of(moved):
        tensor.record_stream(compute)
    return moved

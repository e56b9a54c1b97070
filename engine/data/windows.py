"""Each training batch's place in its gradient-accumulation window.

With ``accumulate_steps = k`` the optimisers step once per window of ``k`` batches, and every
loss in a window is divided by the window's size, so the accumulated gradient is that of the
window's mean loss. The last window of an epoch (or the one cut by ``max_steps``) can be
shorter: it is stepped, with its own size as divisor, never dropped.

When the epoch's length is known (tensors, datasets with ``len``), each place is arithmetic. A
stream of unknown length (an ``IterableDataset``) is read one window ahead, so that a short last
window is known to be short before its first batch runs; under several processes the ranks then
agree on each window's size (the shortest rank's), so that every rank runs the same steps even
when their streams differ in length.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from itertools import chain, islice, repeat
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from engine.distributed.collectives import World, collective, collective_device


def epoch_windows(
    batches: Iterator[Any],
    start: int,
    steps_per_epoch: int | None,
    steps_left: int | None,
    k: int,
    world: World,
) -> Iterator[tuple[Any, int, int]]:
    """``(batch, micro_index, micro_count)`` for the rest of an epoch that resumes at batch
    ``start``: ``steps_per_epoch`` batches in all when known (None for a stream), cut after
    ``steps_left`` more batches when ``max_steps`` ends the run inside this epoch."""
    limit = None if steps_left is None else start + steps_left
    total = (
        steps_per_epoch if limit is None or steps_per_epoch is None else min(steps_per_epoch, limit)
    )
    return in_windows(batches, start, total, limit, k, world)


def in_windows(
    batches: Iterator[Any], start: int, total: int | None, limit: int | None, k: int, world: World
) -> Iterator[tuple[Any, int, int]]:
    """``(batch, micro_index, micro_count)`` for each batch of an epoch.

    ``start`` is the index in the epoch of the first batch ``batches`` yields; ``total`` the
    number of batches the epoch will run in all when known; ``limit`` an upper bound on it when
    not (from ``max_steps``), or None.

    When the places are known in advance they are zipped to the batches by C iterators, so a
    batch costs the loop no Python call here.
    """
    if total is not None:
        indices, counts = _known_places(start, total, k)
        return zip(islice(batches, max(total - start, 0)), indices, counts)
    if k == 1 and not world.is_distributed:
        capped = batches if limit is None else islice(batches, max(limit - start, 0))
        return zip(capped, repeat(0), repeat(1))
    return _read_ahead(batches, start, limit, k, world)


def _known_places(start: int, total: int, k: int) -> tuple[Iterator[int], Iterator[int]]:
    """The ``micro_index`` and ``micro_count`` iterators of batches ``start..total-1``: index
    ``i`` sits at ``i % k`` in a window of ``k``, but the last window (from ``total - total %
    k``) holds only ``total % k`` batches when that is not zero."""
    if k == 1:
        return repeat(0), repeat(1)
    indices = map(operator.mod, range(start, total), repeat(k))
    last_start = total - total % k  # where a short last window starts (== total: none)
    full = max(last_start - start, 0)
    short = total - max(start, last_start)
    counts = chain(repeat(k, full), repeat(total - last_start, short))
    return indices, counts


def _read_ahead(
    batches: Iterator[Any], start: int, limit: int | None, k: int, world: World
) -> Iterator[tuple[Any, int, int]]:
    index = start
    while limit is None or index < limit:
        first = index % k
        wanted = k - first if limit is None else min(k - first, limit - index)
        window = list(islice(batches, wanted))
        size = _shortest_over_ranks(len(window), world)
        if size < len(window):
            logger.warning(
                f"rank {world.rank}: another rank's training stream ended first; this rank "
                f"drops {len(window) - size} batch(es) of its window so that all ranks run the "
                "same steps (give every rank a stream of the same length to avoid this)"
            )
        for micro_index, batch in enumerate(window[:size], first):
            yield batch, micro_index, first + size
        if size < wanted:
            return
        index += size


def _shortest_over_ranks(size: int, world: World) -> int:
    """The smallest window size over the ranks (``size`` itself in one process)."""
    if not world.is_distributed:
        return size
    value = torch.tensor([size], dtype=torch.int64, device=collective_device())
    collective("window size agreement", world, lambda: dist.all_reduce(value, op=dist.ReduceOp.MIN))
    return int(value.item())

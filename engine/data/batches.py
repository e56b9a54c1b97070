"""Turning what the user passes as data into batches for an epoch.

In-memory tensors (a tensor, a dict of tensors, a ``TensorDataset``) take the fast path: whole
batches are cut from a shuffled copy of the data, with no per-sample collation, and the data is
moved to the device once. A map-style ``Dataset`` goes through a ``DataLoader`` driven by our
batch sampler; an ``IterableDataset`` and a ready ``DataLoader`` are iterated as they are.

Every epoch's order is derived from ``(seed, epoch)`` alone, so it is reproducible, different per
epoch, the same on every rank, and an epoch can be restarted at any batch. Under several
processes, each global batch of ``batch_size * world_size`` samples is split between the ranks,
so every rank runs the same number of steps and N ranks see what one process with batch
``N * batch_size`` would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from engine.data.prefetch import fits_on_device, move_to_device, pin, prefetch_to_device
from engine.distributed.collectives import World
from engine.errors import DataError

# Above this many bytes, batches are gathered one by one instead of from a shuffled copy.
_SHUFFLED_COPY_LIMIT = 512 * 2**20
_SEED_STRIDE = 1_000_003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch's shuffle, independent of the global RNG."""
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of an epoch: a permutation of ``range(n)`` (identity without shuffle)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


def batch_bounds(n: int, batch_size: int, drop_last: bool, world: World) -> list[tuple[int, int]]:
    """This rank's ``[start, stop)`` slices of the epoch order, one per step."""
    global_batch = batch_size * world.world_size
    count = n // global_batch if drop_last else math.ceil(n / global_batch)
    bounds = []
    for index in range(count):
        lo = index * global_batch
        hi = min(lo + global_batch, n)
        share = math.ceil((hi - lo) / world.world_size)
        start = min(lo + world.rank * share, hi)
        bounds.append((start, min(start + share, hi)))
    return bounds


def _leaves(data: Any) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Mapping):
        return list(data.values())
    return list(data)


def _gather(leaf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``leaf[index]``, in pinned memory when ``leaf`` is pinned (so its copy can overlap)."""
    if not leaf.is_pinned():
        return leaf.index_select(0, index)
    out = torch.empty((len(index), *leaf.shape[1:]), dtype=leaf.dtype, pin_memory=True)
    return torch.index_select(leaf, 0, index, out=out)


def _sliced(
    template: Any, source: list[torch.Tensor], bounds: list[tuple[int, int]]
) -> Iterator[Any]:
    """The batches ``source[lo:hi]`` in ``template``'s form. A tensor or a one-key mapping (the
    usual ``{"data": x}``) is cut with no per-batch call but the slice itself: this runs once
    per step."""
    if isinstance(template, torch.Tensor):
        (leaf,) = source
        for lo, hi in bounds:
            yield leaf[lo:hi]
    elif isinstance(template, Mapping) and len(source) == 1:
        ((key, _),) = template.items()
        (leaf,) = source
        for lo, hi in bounds:
            yield {key: leaf[lo:hi]}
    else:
        for lo, hi in bounds:
            yield _rebuild(template, [leaf[lo:hi] for leaf in source])


def _gathered(
    template: Any, leaves: list[torch.Tensor], order: torch.Tensor, bounds: list[tuple[int, int]]
) -> Iterator[Any]:
    """The batches ``leaves[order[lo:hi]]``, gathered one at a time."""
    for lo, hi in bounds:
        index = order[lo:hi]
        yield _rebuild(template, [_gather(leaf, index) for leaf in leaves])


def _rebuild(template: Any, leaves: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, torch.Tensor):
        return leaves[0]
    if isinstance(template, Mapping):
        return dict(zip(template.keys(), leaves))
    return list(leaves)


def _check_tensors(data: Any, name: str) -> int:
    """The number of samples of in-memory data; mismatched or empty data is an error."""
    leaves = _leaves(data)
    if not leaves:
        raise DataError(f"{name} data holds no tensors")
    sizes = {}
    keys = list(data.keys()) if isinstance(data, Mapping) else list(range(len(leaves)))
    for key, leaf in zip(keys, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise DataError(f"{name} data entry {key!r} is a {type(leaf).__name__}, not a tensor")
        if leaf.ndim == 0:
            raise DataError(f"{name} data entry {key!r} is a 0-d tensor: it has no samples")
        sizes[key] = leaf.shape[0]
    if len(set(sizes.values())) != 1:
        raise DataError(f"{name} data tensors disagree on the number of samples: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError(f"{name} data is empty (0 samples)")
    return int(n)


@attrs.define(eq=False)
class TensorBatches:
    """The fast path: batches sliced from in-memory tensors kept on the device."""

    template: Any
    leaves: list[torch.Tensor]
    num_samples: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    world: World
    bounds: list[tuple[int, int]]
    device: torch.device | None = None

    def __len__(self) -> int:
        return len(self.bounds)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Batches on ``device``: sliced there, or sliced on the host and prefetched."""
        batches = self._slices(epoch, start)
        if self.device is None or self.leaves[0].device == self.device:
            return batches
        return prefetch_to_device(batches, self.device)

    def first_batch(self) -> Any:
        """A batch of the first batch's size, in data order, on the device: what the pre-flight
        forward runs on (no shuffled copy of the data is made for it)."""
        lo, hi = self.bounds[0]
        batch = _rebuild(self.template, [leaf[: hi - lo] for leaf in self.leaves])
        return batch if self.device is None else move_to_device(batch, self.device)

    def _slices(self, epoch: int, start: int) -> Iterator[Any]:
        """This epoch's batches from batch ``start``: cut from a shuffled copy of the data, or
        gathered one by one when the data is too large to copy."""
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        nbytes = sum(leaf.numel() * leaf.element_size() for leaf in self.leaves)
        bounds = self.bounds[start:]
        if not self.shuffle:
            return _sliced(self.template, self.leaves, bounds)
        order = order.to(self.leaves[0].device)
        if nbytes <= _SHUFFLED_COPY_LIMIT:
            return _sliced(self.template, [_gather(leaf, order) for leaf in self.leaves], bounds)
        return _gathered(self.template, self.leaves, order, bounds)


@attrs.define(eq=False)
class EpochBatchSampler:
    """Index lists for a ``DataLoader`` over a map-style dataset, in the same order as the fast
    path would use; ``set_epoch`` chooses the epoch and the first batch."""

    num_samples: int
    bounds: list[tuple[int, int]]
    shuffle: bool
    seed: int
    epoch: int = 0
    start: int = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.bounds) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        # The order stays a tensor (8 bytes a sample); only each batch becomes a Python list,
        # so a long dataset does not hold a list of n Python ints (about 36 bytes a sample).
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        for lo, hi in self.bounds[self.start :]:
            yield order[lo:hi].tolist()


@attrs.define(eq=False)
class LoaderBatches:
    """Batches from a ``DataLoader`` (ours or the user's), moved to the device one by one."""

    loader: DataLoader[Any]
    device: torch.device
    sampler: EpochBatchSampler | None
    length: int | None
    # The seed of the loaders we build: each epoch reseeds their private generator, so reading
    # data never draws from the global random stream (a DataLoader without a generator takes
    # one draw from it per epoch) and workers get seeds that depend on (seed, epoch) only.
    seed: int | None = None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an iterable dataset has no known length")
        return self.length

    def first_batch(self) -> Any:
        """One batch on the device, for the pre-flight forward: the first batch's samples
        collated in this process (no worker started) for a map-style dataset, else the first
        batch the loader yields (a ``DataLoader`` is iterated anew at each epoch)."""
        if self.sampler is not None:
            lo, hi = self.sampler.bounds[0]
            dataset = self.loader.dataset
            batch = self.loader.collate_fn([dataset[index] for index in range(lo, hi)])
        else:
            batch = next(iter(self.loader), None)
            if batch is None:
                raise DataError("the data yields no batch")
        return move_to_device(batch, self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        if self.seed is not None and self.loader.generator is not None:
            self.loader.generator.manual_seed(self.seed * _SEED_STRIDE + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start)
            skip = 0
        else:
            for holder in (self.loader.sampler, self.loader.batch_sampler):
                set_epoch = getattr(holder, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(epoch)
            skip = start
        batches = (batch for index, batch in enumerate(self.loader) if index >= skip)
        yield from prefetch_to_device(batches, self.device)


Batches = TensorBatches | LoaderBatches


def known_length(batches: Batches) -> int | None:
    """Steps per epoch, or None for an iterable dataset."""
    if isinstance(batches, LoaderBatches):
        return batches.length
    return len(batches)


@attrs.frozen
class BatchOptions:
    """How ``make_batches`` cuts data: the settings every kind of input shares."""

    name: str
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    device: torch.device
    world: World
    on_device: bool = True
    num_workers: int = 0
    lockstep: bool = True


def make_batches(
    data: Any,
    *,
    name: str,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    device: torch.device,
    world: World,
    on_device: bool = True,
    num_workers: int = 0,
    lockstep: bool = True,
) -> Batches:
    """Batches for ``data``; an empty dataset or one that yields no batch is an error.

    ``lockstep`` (training): every rank runs the same
    number of batches, so a last global batch too small to give every rank a sample is an error.
    Without it (evaluation), a rank whose share of the last batch is empty skips that batch:
    every sample is seen exactly once. A Python list is refused: it could hold samples or
    columns (a tuple is read as columns, as a ``TensorDataset``).
    """
    settings = BatchOptions(
        name, batch_size, shuffle, drop_last, seed, device, world, on_device, num_workers, lockstep
    )
    if isinstance(data, DataLoader):
        return _ready_loader(data, settings)
    if isinstance(data, TensorDataset):
        data = tuple(data.tensors)
    if isinstance(data, list):
        raise DataError(_list_message(data, settings.name))
    if isinstance(data, (torch.Tensor, Mapping, tuple)):
        return _tensor_batches(data, settings)
    if isinstance(data, IterableDataset):
        return _stream_batches(data, settings)
    if isinstance(data, Dataset):
        return _dataset_batches(data, settings)
    raise DataError(
        f"{settings.name} data of type {type(data).__name__} is not supported; pass a tensor, a "
        "dict of tensors, a TensorDataset, a Dataset, an IterableDataset or a DataLoader"
    )


def _list_message(data: list[Any], name: str) -> str:
    kinds = sorted({type(item).__name__ for item in data})
    return (
        f"{name} data is a Python list of {len(data)} item(s) ({', '.join(kinds) or 'empty'}): "
        "it could hold samples or columns. Stack samples into one tensor (torch.stack(items)), "
        "or pass columns as a tuple, a dict of tensors or a TensorDataset"
    )


def _ready_loader(loader: DataLoader[Any], settings: BatchOptions) -> LoaderBatches:
    _check_loader_shards(loader, settings.name, settings.world)
    length = _loader_length(loader)
    if length == 0:
        raise DataError(f"{settings.name} DataLoader yields no batches (len(loader) == 0)")
    return LoaderBatches(loader, settings.device, None, length)


def _tensor_batches(data: Any, settings: BatchOptions) -> TensorBatches:
    """The fast path: in-memory tensors, on the device once when they fit."""
    n = _check_tensors(data, settings.name)
    bounds = _bounds_or_error(n, settings)
    leaves = _leaves(data)
    device = settings.device
    if settings.on_device and fits_on_device(leaves, device):
        leaves = [leaf.to(device) for leaf in leaves]
    else:
        leaves = pin(leaves, device)
    return TensorBatches(
        data,
        leaves,
        n,
        settings.batch_size,
        settings.shuffle,
        settings.drop_last,
        settings.seed,
        settings.world,
        bounds,
        device,
    )


def _dataset_batches(data: Dataset[Any], settings: BatchOptions) -> LoaderBatches:
    """A map-style dataset through a DataLoader driven by our epoch batch sampler."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as error:
        raise DataError(f"{settings.name} dataset {type(data).__name__} has no len()") from error
    if n == 0:
        raise DataError(f"{settings.name} data is empty (0 samples)")
    bounds = _bounds_or_error(n, settings)
    sampler = EpochBatchSampler(n, bounds, settings.shuffle, settings.seed)
    loader = _loader(data, settings, sampler)
    return LoaderBatches(loader, settings.device, sampler, len(bounds), settings.seed)


def _stream_batches(data: IterableDataset[Any], settings: BatchOptions) -> LoaderBatches:
    """An iterable dataset, batched by a DataLoader as it streams (its length is unknown)."""
    loader = DataLoader(
        data,
        batch_size=settings.batch_size,
        drop_last=settings.drop_last,
        num_workers=settings.num_workers,
        pin_memory=settings.device.type == "cuda",
        generator=torch.Generator(),
    )
    return LoaderBatches(loader, settings.device, None, None, settings.seed)


def _loader(data: Dataset[Any], settings: BatchOptions, sampler: EpochBatchSampler) -> Any:
    return DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=settings.num_workers,
        pin_memory=settings.device.type == "cuda",
        generator=torch.Generator(),
    )


def _bounds_or_error(n: int, settings: BatchOptions) -> list[tuple[int, int]]:
    batch_size, world, name = settings.batch_size, settings.world, settings.name
    bounds = batch_bounds(n, batch_size, settings.drop_last, world)
    if not settings.lockstep:
        return [(lo, hi) for lo, hi in bounds if hi > lo]
    if not bounds:
        raise DataError(
            f"{name} data yields no batches: {n} samples, batch_size {batch_size} x "
            f"{world.world_size} process(es), drop_last=True"
        )
    last = n - (len(bounds) - 1) * batch_size * world.world_size
    share = math.ceil(last / world.world_size)
    if (world.world_size - 1) * share >= last:
        # Checked for every rank's shard, so that every rank raises, not only the empty one.
        empty = [rank for rank in range(world.world_size) if rank * share >= last]
        raise DataError(
            f"{name} data: {n} samples leave rank(s) {empty} an empty last batch with "
            f"batch_size {batch_size} x {world.world_size} processes (the last global batch "
            f"holds {last} samples); use drop_last=True or a batch size that fits"
        )
    return bounds


def _check_loader_shards(loader: DataLoader[Any], name: str, world: World) -> None:
    """Under several processes, a ready DataLoader over a map-style dataset must shard itself
    (a ``DistributedSampler``): otherwise every rank would read every sample."""
    if not world.is_distributed or isinstance(loader.dataset, IterableDataset):
        return
    holders = (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None))
    if any(hasattr(holder, "num_replicas") for holder in holders):
        return
    raise DataError(
        f"{name} DataLoader under {world.world_size} processes reads every sample on every "
        f"rank (its sampler is a {type(loader.sampler).__name__}); give it a "
        "torch.utils.data.DistributedSampler, or pass the Dataset itself and the engine shards it"
    )


def _loader_length(loader: DataLoader[Any]) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None

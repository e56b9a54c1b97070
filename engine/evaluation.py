"""Evaluation and prediction loops: the strategy's losses averaged over every sample, and the
model's per-sample outputs. Neither changes a parameter, an optimiser, or a random stream of
training: the model runs in eval mode (its previous mode restored after), under a forked RNG.

Under FSDP2 every forward is collective (each unit all-gathers its parameters from the ranks), so
every rank runs as many evaluation forwards as the rank with the most batches: a rank out of
batches runs one it has seen again (or, when it had none, rank 0's first batch), with weight 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from loguru import logger

from engine.context import StepContext
from engine.data.batches import Batches
from engine.data.prefetch import move_to_device
from engine.distributed.collectives import (
    World,
    all_ranks_agree,
    any_rank,
    broadcast_buffers,
    sum_named_over_ranks,
)
from engine.distributed.sharding import is_sharded_model
from engine.distributed.units import reshard_model
from engine.errors import ConfigError, ModelOutputError
from engine.protocols import StepStrategy

# The name under which evaluation's sample count travels with its metric sums.
_SAMPLES = "\x00samples"


def evaluate_batches(
    strategy: StepStrategy, model: torch.nn.Module, batches: Batches, ctx: StepContext
) -> dict[str, float]:
    """Sample-weighted mean of each metric of ``strategy.eval_step`` over ``batches``, summed
    over the ranks (each rank evaluates its own shard of rank 0's model)."""
    broadcast_buffers(model, ctx.world)  # every rank evaluates rank 0's model
    sums: dict[str, torch.Tensor] = {}
    samples = torch.zeros((), dtype=torch.float64, device=ctx.device)
    sized = _lockstep(batches, ctx) if is_sharded_model(model) else _sized(batches)
    with inference(model, ctx):
        for batch, size in sized:
            outputs = eval_step_checked(strategy, model, batch, ctx)
            for key, value in (outputs if size else {}).items():
                weighted = value.detach().double() * size
                sums[key] = sums[key] + weighted if key in sums else weighted
            samples += size
    totals = sum_named_over_ranks({**sums, _SAMPLES: samples}, ctx.world)
    count = totals.pop(_SAMPLES)
    return {key: value / count for key, value in totals.items()}


def _sized(batches: Batches) -> Iterator[tuple[Any, int]]:
    """Each batch of this rank's shard with its number of samples."""
    for batch in batches.epoch(0):
        yield batch, batch_size(batch)


def _lockstep(batches: Batches, ctx: StepContext) -> Iterator[tuple[Any, int]]:
    """``_sized`` with as many batches on every rank as on the rank with the most (one small
    all-reduce per batch): a rank out of batches gets one again with 0 samples, its outputs
    ignored."""
    world = ctx.world
    iterator = iter(batches.epoch(0))
    batch = next(iterator, None)
    if not any_rank(batch is not None, world):
        return
    filler = batch if all_ranks_agree([batch is not None], world)[0] else None
    if filler is None:
        filler = _batch_from_a_rank_that_has_one(batch, world, ctx.device)
    while True:
        if batch is not None:
            yield batch, batch_size(batch)
        else:
            yield filler, 0
        batch = next(iterator, None)
        if not any_rank(batch is not None, world):
            return


def _batch_from_a_rank_that_has_one(batch: Any, world: World, device: torch.device) -> Any:
    """The first batch of the lowest rank that has one, on every rank (collective; for the
    ranks whose shard of the data is empty)."""
    import torch.distributed as dist

    has: list[Any] = [None] * world.world_size
    dist.all_gather_object(has, batch is not None)
    source = has.index(True)
    shared = [move_to_device(batch, torch.device("cpu")) if world.rank == source else None]
    dist.broadcast_object_list(shared, src=source)
    return batch if batch is not None else move_to_device(shared[0], device)


def eval_step_checked(
    strategy: StepStrategy, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor]:
    """``strategy.eval_step``; a model that needs gradients in its forward gets a hint."""
    try:
        return strategy.eval_step(model, batch, ctx)
    except RuntimeError as error:
        if ctx.eval_with_grad or "does not require grad" not in str(error):
            raise
        raise ModelOutputError(
            f"the model's forward needs gradients during evaluation ({error}); its loss calls "
            "torch.autograd.grad (a gradient penalty, HMC steps): set "
            "EngineConfig(eval_with_grad=True)"
        ) from error


def predict_batches(
    strategy: StepStrategy, model: torch.nn.Module, batches: Batches, ctx: StepContext
) -> dict[str, torch.Tensor]:
    """Per-sample outputs of ``strategy.predict_step`` (tensors whose first dimension is the
    batch's size), concatenated per key on the CPU. Other outputs (losses, per-batch values such
    as a codebook) are left out, and their names logged once."""
    parts: dict[str, list[torch.Tensor]] = {}
    left_out: set[str] = set()
    with inference(model, ctx):
        for batch in batches.epoch(0):
            size = batch_size(batch)
            for key, value in strategy.predict_step(model, batch, ctx).items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
                    parts.setdefault(key, []).append(value.detach().cpu())
                else:
                    left_out.add(key)
    per_sample = {key: torch.cat(values) for key, values in parts.items()}
    dropped = sorted(left_out - set(per_sample))
    if dropped:
        logger.info(f"predict: outputs {dropped} are not per-sample tensors and are left out")
    return per_sample


@contextmanager
def inference(model: torch.nn.Module, ctx: StepContext) -> Iterator[None]:
    """Eval mode and a forked RNG for the duration, the model's mode restored after. Gradients
    stay off unless ``ctx.eval_with_grad`` (models whose loss calls ``autograd.grad``).

    An FSDP2 model's units are put back on their shards after it (a local op): its forwards are
    followed by no backward, so with ``fsdp_reshard_after_forward=False`` they would leave each
    unit gathered, the model listing the gathered copies as its parameters in place of the
    shards the optimisers and a sharded checkpoint know (``engine/distributed/units.py``). This
    covers evaluation, prediction and the pre-flight forward, which all run inside it."""
    was_training = model.training
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    grad = torch.enable_grad() if ctx.eval_with_grad else torch.no_grad()
    with torch.random.fork_rng(devices=devices), grad:
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            reshard_model(model)


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first non-scalar tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ConfigError(f"can not tell the batch size of a {type(batch).__name__} batch")

"""Training metrics kept on the device and read once per log interval.

A step only appends its metric mapping (detached device tensors) to a list; ``flush`` groups
them by key, stacks each key's values, sums them on the device and reads all the sums in one
transfer, checks they are finite, and folds them into the epoch's running sums. Under several
processes, the sums and counts are added over the ranks before averaging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from engine.distributed.collectives import World, sum_over_ranks
from engine.errors import ModelOutputError, NonFiniteLossError

if TYPE_CHECKING:
    from engine.state import RunState


class MetricBuffer:
    """Per-step metric tensors of the current interval, and float sums of the epoch.

    ``add`` keeps a reference to the step's mapping (one append: it runs every step); the
    mapping is read at the next ``flush`` and must not change in between (``RunState``'s
    ``step_metrics`` is that same mapping, typed read-only).
    """

    def __init__(self) -> None:
        self._entries: list[tuple[int, Mapping[str, torch.Tensor]]] = []
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, step: int, metrics: Mapping[str, torch.Tensor]) -> None:
        self._entries.append((step, metrics))

    def _pending(self) -> dict[str, tuple[list[torch.Tensor], list[int]]]:
        """The unread values and their steps, per key, in step order."""
        pending: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
        for step, metrics in self._entries:
            for key, value in metrics.items():
                if not isinstance(value, torch.Tensor) or value.ndim != 0:
                    check_metric(f"train_step at step {step}", key, value)
                entry = pending.get(key)
                if entry is None:
                    entry = pending[key] = ([], [])
                entry[0].append(value)
                entry[1].append(step)
        return pending

    def flush(self, world: World) -> dict[str, float]:
        """Means over the pending steps (all ranks); raises on a non-finite value."""
        stacked = _stacked_by_key(self._entries)
        if stacked is None:  # keys, devices or kinds of value differ between steps
            pending = self._pending()
            # A model may return some metrics on the host while it trains on a GPU: gather there.
            device = next(iter(pending.values()))[0][0].device if pending else None
            stacked = {key: _stack(values, device) for key, (values, _) in pending.items()}
        keys = sorted(stacked)
        if not keys:
            self._entries.clear()
            return {}
        # One read for every key: a non-finite value makes its key's sum non-finite.
        totals = torch.stack([stacked[key].sum() for key in keys]).double().cpu()
        if not bool(torch.isfinite(totals).all()):
            pending = self._pending()
            self._entries.clear()
            _raise_non_finite(keys, totals, stacked, pending)
        self._entries.clear()
        count_tensor = torch.tensor([len(stacked[key]) for key in keys], dtype=torch.float64)
        if world.is_distributed:
            both = sum_over_ranks(torch.cat([totals, count_tensor]).to(_collective_device()), world)
            totals, count_tensor = both.cpu().split(len(keys))
        means = {}
        for key, total, count in zip(keys, totals.tolist(), count_tensor.tolist()):
            self._sums[key] = self._sums.get(key, 0.0) + total
            self._counts[key] = self._counts.get(key, 0) + int(count)
            means[key] = total / count
        return means

    def epoch_means(self, world: World) -> dict[str, float]:
        """Flush, then the means over the whole epoch so far; resets the epoch sums."""
        self.flush(world)
        means = {key: self._sums[key] / self._counts[key] for key in self._sums}
        self._sums.clear()
        self._counts.clear()
        return means

    def discard(self) -> None:
        self._entries.clear()
        self._sums.clear()
        self._counts.clear()

    def state_dict(self) -> dict[str, Any]:
        """The unread step values and the epoch's sums, so that a resume mid-epoch averages
        exactly what an uninterrupted run would (same values, same grouping)."""
        return {
            "pending": {
                key: {"values": torch.stack(values).detach().cpu(), "steps": list(steps)}
                for key, (values, steps) in self._pending().items()
            },
            "sums": dict(self._sums),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        by_step: dict[int, dict[str, torch.Tensor]] = {}
        for key, entry in state["pending"].items():
            values = entry["values"].to(device).unbind(0)
            for step, value in zip(entry["steps"], values):
                by_step.setdefault(int(step), {})[key] = value
        self._entries = sorted(by_step.items(), key=lambda item: item[0])
        self._sums = {key: float(value) for key, value in state["sums"].items()}
        self._counts = {key: int(value) for key, value in state["counts"].items()}


def _stacked_by_key(
    entries: list[tuple[int, Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor] | None:
    """Each key's values in step order as one float tensor, from ONE stack of every value, when
    every step returned the same keys in the same order, all 0-d tensors on one device (the
    usual case: a flush then costs a few calls, not a few per step); None otherwise."""
    if not entries:
        return {}
    keys = tuple(entries[0][1])
    values: list[Any] = []
    for _, metrics in entries:
        if tuple(metrics) != keys:
            return None
        values += metrics.values()
    try:
        stacked = torch.stack(values)
    except (RuntimeError, TypeError):  # several devices, or a value that is not a tensor
        return None
    if stacked.ndim != 1:  # a value that is not 0-d: the general path names it
        return None
    columns = stacked.float().view(len(entries), len(keys)).t()
    return {key: column.contiguous() for key, column in zip(keys, columns)}


def _stack(values: list[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    """``values`` as one float tensor on ``device``; each is converted only when they are not
    all there already (the usual case is one stack, no per-value call)."""
    try:
        stacked = torch.stack(values)
    except RuntimeError:  # values on several devices
        return torch.stack([value.float().to(device) for value in values])
    return stacked.float().to(device)


def _raise_non_finite(
    keys: list[str],
    totals: torch.Tensor,
    stacked: Mapping[str, torch.Tensor],
    pending: Mapping[str, tuple[list[torch.Tensor], list[int]]],
) -> None:
    """The error naming the first key (sorted) with a non-finite value, the value, its step;
    none when only a sum overflowed (finite values whose sum is not: reported as it is)."""
    for key, total in zip(keys, totals.tolist()):
        if math.isfinite(total):
            continue
        as_list = stacked[key].tolist()
        bad = next((i for i, v in enumerate(as_list) if not math.isfinite(v)), None)
        if bad is None:
            continue
        raise NonFiniteLossError(
            f"metric {key!r} is {as_list[bad]} at step {pending[key][1][bad]}; set "
            "EngineConfig(nonfinite='skip') to skip such steps instead"
        )


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo takes CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def track_best(run: RunState, metrics: Mapping[str, float], epoch: int, mode: str) -> None:
    """Keep ``run.best_value``/``best_epoch`` for the monitored metric of an epoch's summary.
    An epoch without it (no evaluation this epoch, or a metric a callback adds later at
    EPOCH_END, such as ``QualityMetrics``' FID, which then ranks the epoch itself) is skipped:
    pre-flight has already refused a monitor the run never produces."""
    monitor = run.monitor
    if monitor is None or monitor not in metrics:
        return
    value = metrics[monitor]
    best = run.best_value
    if best is None or (value < best if mode == "min" else value > best):
        run.best_value, run.best_epoch = value, epoch


def check_metric(strategy: str, key: Any, value: Any) -> None:
    """A step metric is a 0-d tensor under a string key (it is averaged on the device)."""
    if not isinstance(key, str):
        raise ModelOutputError(f"{strategy}: metric keys must be strings, got {key!r}")
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return
    if isinstance(value, torch.Tensor):
        got = f"a tensor of shape {tuple(value.shape)}: reduce it to one value (e.g. .mean())"
    else:
        got = f"a {type(value).__name__} ({value!r:.40}): return a tensor (torch.as_tensor)"
    raise ModelOutputError(f"{strategy}: metric {key!r} must be a 0-d tensor, got {got}")

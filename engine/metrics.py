"""Training metrics kept on the device and read once per log interval.

A step only appends its detached metric tensors to a list; ``flush`` stacks them, reads them in
one transfer per metric, checks they are finite, and folds them into the epoch's running sums.
Under several processes, the sums and counts are added over the ranks before averaging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from engine.distributed.collectives import World, sum_over_ranks
from engine.errors import ConfigError, NonFiniteLossError

if TYPE_CHECKING:
    from engine.state import RunState


class MetricBuffer:
    """Per-step metric tensors of the current interval, and float sums of the epoch."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, step: int, metrics: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = ([], [])
            entry[0].append(value)
            entry[1].append(step)

    def flush(self, world: World) -> dict[str, float]:
        """Means over the pending steps (all ranks); raises on a non-finite value."""
        keys = sorted(self._pending)
        sums, counts = [], []
        # A model may return some metrics on the host while it trains on a GPU: gather there.
        device = self._pending[keys[0]][0][0].device if keys else None
        for key in keys:
            values, steps = self._pending[key]
            stacked = torch.stack([value.float().to(device) for value in values])
            if not bool(torch.isfinite(stacked).all()):
                as_list = stacked.tolist()
                bad = next(i for i, v in enumerate(as_list) if not math.isfinite(v))
                raise NonFiniteLossError(
                    f"metric {key!r} is {as_list[bad]} at step {steps[bad]}; set "
                    "EngineConfig(nonfinite='skip') to skip such steps instead"
                )
            sums.append(stacked.sum())
            counts.append(len(values))
        self._pending.clear()
        if not keys:
            return {}
        totals = torch.stack(sums).double().cpu()
        count_tensor = torch.tensor(counts, dtype=torch.float64)
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
        self._pending.clear()
        self._sums.clear()
        self._counts.clear()

    def state_dict(self) -> dict[str, Any]:
        """The unread step values and the epoch's sums, so that a resume mid-epoch averages
        exactly what an uninterrupted run would (same values, same grouping)."""
        return {
            "pending": {
                key: {"values": torch.stack(values).detach().cpu(), "steps": list(steps)}
                for key, (values, steps) in self._pending.items()
            },
            "sums": dict(self._sums),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self._pending = {
            key: (list(entry["values"].to(device).unbind(0)), [int(s) for s in entry["steps"]])
            for key, entry in state["pending"].items()
        }
        self._sums = {key: float(value) for key, value in state["sums"].items()}
        self._counts = {key: int(value) for key, value in state["counts"].items()}


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo takes CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def track_best(run: RunState, metrics: Mapping[str, float], epoch: int, mode: str) -> None:
    """Keep ``run.best_value``/``best_epoch`` for the monitored metric of an epoch's summary;
    a monitor that names no metric of the epoch is an error (an ``eval/`` one waits for an
    epoch with evaluation)."""
    monitor = run.monitor
    if monitor is None:
        return
    if monitor not in metrics:
        if monitor.startswith("eval/") and not any(key.startswith("eval/") for key in metrics):
            return  # no evaluation this epoch
        raise ConfigError(
            f"monitored metric {monitor!r} is not among this epoch's metrics {sorted(metrics)}"
        )
    value = metrics[monitor]
    best = run.best_value
    if best is None or (value < best if mode == "min" else value > best):
        run.best_value, run.best_epoch = value, epoch

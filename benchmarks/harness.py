"""Timing many trainers in one process, interleaved, so machine noise hits them all alike.

A ``Runner`` prepares fresh state outside the clock (a copy of the same initial model, its own
optimiser) and returns a function that trains one epoch and returns how many steps it ran. The
clock covers that function only. On CUDA the interval is taken with CUDA events recorded at the
edges, with one synchronisation after the epoch; nothing inside the epoch synchronises.

On the CPU with one torch thread, the default clock is the CPU time of the calling thread
(``time.thread_time``): all the work (forward, backward, optimiser, data) runs in that thread,
and time spent waiting while other processes hold the cores is not counted, so the figures
stay comparable on a shared, busy machine. ``clock="wall"`` takes wall time instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import attrs
import torch

EpochFn = Callable[[], int]


@attrs.frozen
class Runner:
    """A named trainer: ``prepare()`` builds its state and returns the epoch to time."""

    name: str
    prepare: Callable[[], EpochFn]


@attrs.frozen
class Timing:
    """Milliseconds per step of every repeat of one runner, with the batch size behind them."""

    name: str
    batch_size: int
    ms_per_step: tuple[float, ...]
    peak_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.ms_per_step)

    @property
    def low(self) -> float:
        return min(self.ms_per_step)

    @property
    def high(self) -> float:
        return max(self.ms_per_step)

    @property
    def samples_per_second(self) -> float:
        return self.batch_size * 1000.0 / self.median


def default_clock(device: torch.device) -> str:
    """``cpu`` (thread CPU time) on the CPU with one torch thread, else ``wall``."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def time_epoch(epoch: EpochFn, device: torch.device, clock: str = "wall") -> tuple[float, int]:
    """Seconds for one epoch and its step count, synchronising only at the edges."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        steps = epoch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, steps
    now = time.thread_time if clock == "cpu" else time.perf_counter
    started = now()
    steps = epoch()
    return now() - started, steps


def interleave(
    runners: Sequence[Runner],
    batch_size: int,
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    clock: str | None = None,
) -> list[Timing]:
    """Time every runner ``repeats`` times, rotating the order each round; the first ``warmup``
    rounds are run but not kept. On CUDA, peak memory per runner is recorded too."""
    clock = clock or default_clock(device)
    times: dict[str, list[float]] = {runner.name: [] for runner in runners}
    peaks: dict[str, int] = {}
    for round_index in range(warmup + repeats):
        shift = round_index % len(runners)
        for runner in list(runners[shift:]) + list(runners[:shift]):
            epoch = runner.prepare()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, steps = time_epoch(epoch, device, clock)
            if device.type == "cuda":
                peaks[runner.name] = max(
                    peaks.get(runner.name, 0), torch.cuda.max_memory_allocated(device)
                )
            if round_index >= warmup:
                times[runner.name].append(seconds * 1000.0 / steps)
    return [
        Timing(runner.name, batch_size, tuple(times[runner.name]), peaks.get(runner.name))
        for runner in runners
    ]


def paired_ratio(timing: Timing, base: Timing) -> float:
    """Median over rounds of ``timing``'s time divided by ``base``'s in the same round."""
    return statistics.median(a / b for a, b in zip(timing.ms_per_step, base.ms_per_step))


def markdown_table(title: str, timings: Sequence[Timing], floor: str) -> str:
    """A markdown table of ms/step (median, min-max), ratio to ``floor``, samples/s, memory.

    The ratio is the median over rounds of each round's ratio (the runs of a round are
    adjacent in time, so a load that drifts over the run cancels out), and beside it the ratio
    of the minimums (the least disturbed runs)."""
    base = next(t for t in timings if t.name == floor)
    lines = [
        f"**{title}**",
        "",
        "| trainer | batch | ms/step median | min-max | x floor | x floor (min) | samples/s "
        "| peak mem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        memory = "-" if t.peak_bytes is None else f"{t.peak_bytes / 2**20:.1f} MiB"
        lines.append(
            f"| {t.name} | {t.batch_size} | {t.median:.3f} | {t.low:.3f}-{t.high:.3f} | "
            f"{paired_ratio(t, base):.3f} | {t.low / base.low:.3f} | "
            f"{t.samples_per_second:,.0f} | {memory} |"
        )
    return "\n".join(lines)


def device_from(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

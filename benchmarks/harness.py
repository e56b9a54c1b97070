"""Timing many trainers in one process, interleaved, so machine noise hits them all alike.

A ``Runner`` prepares fresh state outside the clock (a copy of the same initial model, its own
optimiser) and returns a function that trains one epoch and returns how many steps it ran. The
clock covers that function only; a function that must warm up first (a compiled engine: its
first epoch compiles) times itself instead and returns a ``Timed``, whose warm-up is reported
apart. On CUDA the interval is taken with CUDA events recorded at the
edges, with one synchronisation after the epoch; nothing inside the epoch synchronises.

On the CPU with one torch thread, the default clock is the CPU time of the calling thread
(``time.thread_time``): all the work (forward, backward, optimiser, data) runs in that thread,
and time spent waiting while other processes hold the cores is not counted, so the figures
stay comparable on a shared, busy machine. ``clock="wall"`` takes wall time instead.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch


@attrs.frozen
class Timed:
    """What an epoch function that times itself returns (a compiled engine, say, whose first
    epoch compiles): its timed steps, the seconds of the timed part by clock (``cpu``,
    ``wall``, and ``cuda`` on a GPU; see ``Marks``), and the seconds of what ran before it
    (the warm-up, reported apart)."""

    steps: int
    seconds: Mapping[str, float]
    warmup: Mapping[str, float]


EpochFn = Callable[[], int | Timed]


@attrs.frozen
class Marks:
    """One instant on every clock the harness reads: thread CPU time, wall time, and a CUDA
    event recorded on the current stream on a GPU (read after a synchronisation)."""

    cpu: float
    wall: float
    cuda: Any = None

    @classmethod
    def now(cls, device: torch.device) -> Marks:
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return cls(time.thread_time(), time.perf_counter(), event)

    def until(self, later: Marks) -> dict[str, float]:
        """Seconds from this mark to ``later`` on each clock (CUDA's once it has finished)."""
        seconds = {"cpu": later.cpu - self.cpu, "wall": later.wall - self.wall}
        if self.cuda is not None and later.cuda is not None:
            later.cuda.synchronize()
            seconds["cuda"] = self.cuda.elapsed_time(later.cuda) / 1000.0
        return seconds


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
    warmup_s: tuple[float, ...] = ()  # per kept round, for runners that time themselves
    first_warmup_s: float | None = None  # the first round's (cold: the process compiles)

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


def time_epoch(
    epoch: EpochFn, device: torch.device, clock: str = "wall"
) -> tuple[float, int, float | None]:
    """Seconds for one epoch, its step count and, for an epoch that times itself (``Timed``),
    its warm-up's wall-clock seconds (what a user waits; compilers run in worker processes);
    synchronising only at the edges."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        result = epoch()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
    else:
        now = time.thread_time if clock == "cpu" else time.perf_counter
        started = now()
        result = epoch()
        seconds = now() - started
    if isinstance(
        result, Timed
    ):  # its warm-up (compilation, partly in worker processes) in wall time
        key = "cuda" if device.type == "cuda" else clock
        return result.seconds[key], result.steps, result.warmup["wall"]
    return seconds, result, None


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
    warmups: dict[str, list[float]] = {runner.name: [] for runner in runners}
    first_warmup: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for round_index in range(warmup + repeats):
        shift = round_index % len(runners)
        for runner in list(runners[shift:]) + list(runners[:shift]):
            epoch = runner.prepare()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, steps, warmup_seconds = time_epoch(epoch, device, clock)
            if device.type == "cuda":
                peaks[runner.name] = max(
                    peaks.get(runner.name, 0), torch.cuda.max_memory_allocated(device)
                )
            if warmup_seconds is not None:
                first_warmup.setdefault(runner.name, warmup_seconds)
            if round_index >= warmup:
                times[runner.name].append(seconds * 1000.0 / steps)
                if warmup_seconds is not None:
                    warmups[runner.name].append(warmup_seconds)
    return [
        Timing(
            runner.name,
            batch_size,
            tuple(times[runner.name]),
            peaks.get(runner.name),
            tuple(warmups[runner.name]),
            first_warmup.get(runner.name),
        )
        for runner in runners
    ]


def paired_ratio(timing: Timing, base: Timing) -> float:
    """Median over rounds of ``timing``'s time divided by ``base``'s in the same round."""
    return statistics.median(a / b for a, b in zip(timing.ms_per_step, base.ms_per_step))


def quantile(values: Sequence[float], q: float) -> float:
    """The value at fraction ``q`` of ``values`` sorted (0: the minimum, 0.5: the median of
    an odd count), with no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def shuffled_rounds(
    epochs: Mapping[str, Callable[[], int]], rounds: int, seed: int = 0
) -> dict[str, list[float]]:
    """Microseconds per step of each epoch function (which returns its step count) per round,
    on the training thread's CPU clock, after one warm-up run each (first-call caches, the
    allocator's pools); the order is shuffled every round, from ``seed``."""
    for epoch in epochs.values():
        epoch()
    times: dict[str, list[float]] = {name: [] for name in epochs}
    order = list(epochs)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            started = time.thread_time()
            done = epochs[name]()
            times[name].append((time.thread_time() - started) / done * 1e6)
    return times


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
    for t in timings:
        if t.first_warmup_s is not None:
            later = f"{statistics.median(t.warmup_s):.2f} s" if t.warmup_s else "-"
            lines.append(
                f"\n{t.name}: timed is its second epoch (no fit setup in it); compilation (its "
                f"first epoch's wall time beyond the timed one's): {t.first_warmup_s:.1f} s in the "
                f"process's first fit, {later} in later fits (median)"
            )
    return "\n".join(lines)


def device_from(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

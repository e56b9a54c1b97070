"""The engine's microseconds per step over the hand-written floor, with the floor run twice.

For each workload: the floor (the suite's hand-written loop, which computes bitwise the
engine's parameters: ``tests/benchmarks/test_same_arithmetic.py``), the same floor again, and
the engine, each a whole one-epoch run (the engine's per-fit setup included, spread over the
steps), in a random order each round, on the training thread's CPU clock. Each is reported as
its difference to the floor in us per step at the minimum, the 10% quantile and the median over
the rounds. "floor again" is the method's own noise: a difference within its spread is not one.
The suite's ratios (``benchmarks/suite.py``) move by a few percent between runs; differences of
many rounds of short epochs resolve about 5-10 us here.

The per-fit part is measured apart, the same way, on fits of one step (five times as many
rounds: they are short): its difference to the floor is the engine's setup (pre-flight forward,
optimisers, the first and last log lines) plus one step's overhead. The per-step overhead
without the setup is then ``(n * per_step - per_fit) / (n - 1)`` for epochs of ``n`` steps,
at each quantile. Run from the repository root::

    python benchmarks/per_step.py                      # the four 1x4x4 workloads (~5 minutes)
    python benchmarks/per_step.py --workloads rae_l2_1x4x4 --rounds 61
    python benchmarks/per_step.py --tiny               # 2 rounds of 5 steps: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.grouped import grouped_runners
from benchmarks.harness import quantile, shuffled_rounds
from benchmarks.loops import standard_runners
from benchmarks.workloads import WORKLOADS

SMALL = ("mlp_vae_1x4x4", "adversarial_ae_1x4x4", "rae_l2_1x4x4", "vaegan_1x4x4")
QUANTILES = {"min": 0.0, "q10": 0.1, "median": 0.5}


def epochs_of(workload: str, steps: int) -> dict[str, Callable[[], int]]:
    """The floor, the floor again (a second copy, its own model) and the engine."""
    spec = WORKLOADS[workload]
    device = torch.device("cpu")
    data = spec.data(64 * steps)
    runners = (
        standard_runners(spec.make_model, data, 64, device)
        if spec.strategy == "Standard"
        else grouped_runners(spec.strategy, spec.make_model, data, 64, device)
    )
    floor, engine = runners[0], runners[1]  # the suite's order: floor, engine, others
    return {"floor": floor.prepare(), "floor again": floor.prepare(), "engine": engine.prepare()}


def measure(workload: str, steps: int, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """us/step of each run per round (thread CPU time), the order shuffled every round."""
    return shuffled_rounds(epochs_of(workload, steps), rounds, seed)


def over_floor(times: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Each run's difference to the floor, in us per step, at each of ``QUANTILES``."""
    base = times["floor"]
    return {
        name: {label: quantile(values, q) - quantile(base, q) for label, q in QUANTILES.items()}
        for name, values in times.items()
        if name != "floor"
    }


def without_setup(
    per_step: Mapping[str, float], per_fit: Mapping[str, float], steps: int
) -> dict[str, float]:
    """The per-step difference with the per-fit one taken out, at each quantile: an epoch of
    ``steps`` costs ``setup + steps * step`` over the floor and a one-step fit ``setup + step``."""
    return {label: (steps * per_step[label] - per_fit[label]) / (steps - 1) for label in per_step}


def report(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    fits: Mapping[str, Mapping[str, Sequence[float]]],
    steps: int,
) -> str:
    """One row per workload: the floor's speed, the noise, the engine's difference per step
    (setup included), per one-step fit, and per step without the setup."""
    lines = [
        "| workload (strategy) | floor us/step (min) | floor again - floor (min / q10 / median) "
        "| engine - floor, us/step (min / q10 / median) | per fit, us (min / q10 / median) "
        "| per step without the setup |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(values: Mapping[str, float]) -> str:
        return " / ".join(f"{values[label]:+.1f}" for label in QUANTILES)

    for workload, times in results.items():
        over, per_fit = over_floor(times), over_floor(fits[workload])["engine"]
        marginal = without_setup(over["engine"], per_fit, steps)
        strategy = WORKLOADS[workload].strategy
        lines.append(
            f"| {workload} ({strategy}) | {min(times['floor']):.1f} | {cell(over['floor again'])} "
            f"| {cell(over['engine'])} | {cell(per_fit)} | {cell(marginal)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(SMALL), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch (batch 64)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--tiny", action="store_true", help="2 rounds of 5 steps")
    args = parser.parse_args(argv)
    steps, rounds = (5, 2) if args.tiny else (args.steps, args.rounds)
    torch.set_num_threads(1)
    from loguru import logger

    logger.remove()  # the engine's per-fit log lines are not what is measured
    results = {name: measure(name, steps, rounds) for name in args.workloads}
    fits = {name: measure(name, 1, 5 * rounds) for name in args.workloads}
    text = report(results, fits, steps)
    print(
        f"batch 64, {steps} steps per epoch, {rounds} rounds (one-step fits: {5 * rounds}), "
        "1 thread, CPU time"
    )
    print(text)
    return text


if __name__ == "__main__":
    # Denormals slow a long run (benchmarks/denormals.py). Flushing them is process-wide and
    # cannot be read back, so only the script sets it, not main() (which the tests call).
    torch.set_flush_denormal(True)
    main()

"""What a little Python costs inside a training step, against what it costs in a warm loop.

The engine's overhead over a hand-written loop is Python: a few helper calls per step. Counted
in instructions (``benchmarks/instructions.py``) it is a few microseconds at the rate a warm
``timeit`` loop runs Python; by the clock it is several times more. This measures why: the same
small piece of Python (a loss read through a method, two small dicts: about what one engine
helper does), run ``n`` times between the backward and the optimiser step of the hand-written
MLP VAE 1x4x4 loop, against the loop without it, interleaved and in random order; and beside
it the same piece's cost in a warm ``timeit`` loop. A second copy of the plain loop
("floor again") shows the method's own noise. Between the step's kernels the Python runs cold,
so its first calls cost several times their warm cost, and more calls cost little more each.
That is why ``Standard`` calls the backward and the optimiser step directly where a step needs
nothing more (``strategies/update.py``'s ``is_plain_step``). Run from the repository root::

    python benchmarks/python_in_step.py            # 41 rounds of 200 steps (about 1 minute)
    python benchmarks/python_in_step.py --tiny     # 3 rounds of 10 steps: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.harness import quantile, shuffled_rounds
from benchmarks.loops import fused_adam
from benchmarks.workloads import WORKLOADS

CALLS = (1, 10, 40)


class _Reader:
    """Stands for an engine helper: reads a loss from the model's outputs, with its checks."""

    def read(self, outputs: Mapping[str, Any], key: str) -> torch.Tensor:
        loss = outputs.get(key)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"no scalar loss {key!r}")
        return loss


def python_piece(n: int, reader: _Reader, outputs: Mapping[str, Any]) -> None:
    """The piece of Python measured, ``n`` times."""
    for _ in range(n):
        reader.read(outputs, "loss")
        flags = dict.fromkeys(("a", "b"), True)
        flags.update({"c": False})


def loop_epoch(data: torch.Tensor, model: torch.nn.Module, n: int) -> Callable[[], int]:
    """One epoch of the hand-written loop with ``python_piece(n)`` in each step: the suite's
    floor (``benchmarks/loops.py``'s ``sliced_epoch``) written out with the piece in it, so
    that the floor the suite times keeps no hook of this measurement."""
    reader = _Reader()
    outputs = {"loss": torch.zeros(())}

    def epoch() -> int:
        generator = torch.Generator().manual_seed(0)
        optimizer = fused_adam(model)
        shuffled = data.index_select(0, torch.randperm(len(data), generator=generator))
        losses = []
        for lo in range(0, len(data), 64):
            loss = model({"data": shuffled[lo : lo + 64]})["loss"]
            loss.backward()
            if n:
                python_piece(n, reader, outputs)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.stack(losses).mean().item()
        return len(losses)

    return epoch


def measure(steps: int, rounds: int, calls: Sequence[int] = CALLS) -> dict[str, Any]:
    """us/step of each variant per round (thread CPU time), and the piece's warm cost."""
    torch.manual_seed(0)
    workload = WORKLOADS["mlp_vae_1x4x4"]
    data = workload.data(64 * steps)
    model = workload.make_model()
    variants = {"floor": 0, "floor again": 0, **{f"floor + piece x{n}": n for n in calls}}
    epochs = {name: loop_epoch(data, model, n) for name, n in variants.items()}
    times = shuffled_rounds(epochs, rounds)
    reader, outputs = _Reader(), {"loss": torch.zeros(())}
    warm = {
        name: min(timeit.repeat(lambda n=n: python_piece(n, reader, outputs), number=500, repeat=5))
        / 500
        * 1e6
        for name, n in variants.items()
    }
    return {"times": times, "warm": warm}


def report(result: Mapping[str, Any]) -> str:
    """A markdown table: each variant's us/step and its difference to the floor (minimum, 10%
    quantile, median over the rounds) beside the piece's warm cost."""
    times, warm = result["times"], result["warm"]
    base = times["floor"]
    lines = [
        "| variant | us/step min | + over floor (min / q10 / median) | piece in a warm loop, us |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        over = [quantile(values, q) - quantile(base, q) for q in (0.0, 0.1, 0.5)]
        lines.append(
            f"| {name} | {min(values):.1f} | {over[0]:+.1f} / {over[1]:+.1f} / {over[2]:+.1f} "
            f"| {warm[name]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--tiny", action="store_true", help="3 rounds of 10 steps")
    args = parser.parse_args(argv)
    steps, rounds = (10, 3) if args.tiny else (args.steps, args.rounds)
    torch.set_num_threads(1)
    text = report(measure(steps, rounds))
    print(f"MLP VAE 1x4x4 hand-written loop, batch 64, {steps} steps x {rounds} rounds, 1 thread")
    print(text)
    return text


if __name__ == "__main__":
    # Denormals slow a long run (benchmarks/denormals.py). Flushing them is process-wide and
    # cannot be read back, so only the script sets it, not main() (which the tests call).
    torch.set_flush_denormal(True)
    main()

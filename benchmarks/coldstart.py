"""Cold start: a fresh process that imports what it needs and trains one step.

The hand-written script imports torch and the model and takes one step; the engine script also
imports ``engine`` and ``strategies`` and runs ``Engine.fit`` for one step with the default
config (so it also creates its run folder and ``train.log``). Both run as child
processes, alternating, and the wall time of each whole child is compared (interpreter start
and ``import torch`` are the same in both). Lightning's import alone is timed when installed.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SETUP = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import torch
from examples.models import VAE
torch.manual_seed(0)
data = torch.rand(1024, 1, 4, 4)
model = VAE(input_shape=(1, 4, 4))
"""

HAND_WRITTEN = (
    _SETUP
    + """
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
loss = model({"data": data[:64]})["loss"]
loss.backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)
print(loss.detach().item())
"""
)

ENGINE = (
    _SETUP
    + """
from engine import Engine, EngineConfig, OptimizerSpec
from strategies import Standard
engine = Engine(Standard(OptimizerSpec("Adam", lr=1e-3)),
                EngineConfig(max_steps=1, batch_size=64, device="cpu"))
print(engine.fit(model, {"data": data}).steps)
"""
)

LIGHTNING_IMPORT = "import torch\nimport lightning\n"
TORCH_IMPORT = "import torch\n"


def _seconds(source: str) -> float:
    """Wall seconds of a child running ``source`` in a scratch folder (the engine's default
    config writes its run folder and ``train.log`` there)."""
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", source], check=True, capture_output=True, cwd=scratch)
        return time.perf_counter() - started


def measure(repeats: int = 7) -> dict[str, list[float]]:
    """Wall seconds of each child, ``repeats`` times, alternating."""
    scripts = {"hand-written": HAND_WRITTEN, "engine": ENGINE, "import torch": TORCH_IMPORT}
    if importlib.util.find_spec("lightning") is not None:
        scripts["import torch + lightning"] = LIGHTNING_IMPORT
    times: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(repeats):
        for name, source in scripts.items():
            times[name].append(_seconds(source))
    return times


def report(times: dict[str, list[float]]) -> str:
    lines = [
        "**Cold start** (fresh process: imports + first step; wall seconds)",
        "",
        "| child process | median s | min-max s |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(
            f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |"
        )
    extra = statistics.median(times["engine"]) - statistics.median(times["hand-written"])
    lines += ["", f"engine - hand-written: {extra:+.3f} s (target <= 0.3 s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(measure(3 if "--tiny" in sys.argv else 7)))

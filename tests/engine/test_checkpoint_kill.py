"""A real ``kill -9``: a training process killed at random moments (and inside a save), then
resumed each time, ends exactly where an uninterrupted run ends.

Run as a script, this file is the worker: ``python test_checkpoint_kill.py OUTPUT_DIR RESULT``
trains (resuming from ``OUTPUT_DIR/run``'s last checkpoint when there is one) and saves its
final state to ``RESULT``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.checkpoint_cases import equal

ROOT = Path(__file__).resolve().parents[2]
SEED_VARIABLE = "KILL_TEST_SEED"


def train(output_dir: Path) -> dict[str, Any]:
    """Train (resuming from the run's last checkpoint if any); the final state."""
    from callbacks import Checkpointing, MetricsHistory
    from engine import Engine, EngineConfig
    from engine.checkpoint.format import latest_checkpoint
    from tests.engine.checkpoint_cases import data, make_case, without_seconds

    model, strategy = make_case("adversarial", seed=0, n_critic=2)
    config = EngineConfig(
        epochs=4,
        batch_size=4,
        accumulate_steps=2,
        log_every=3,
        device="cpu",
        output_dir=output_dir,
        run_name="run",
    )
    history = MetricsHistory()
    # Not durable: a killed process loses nothing the page cache holds; only a power cut needs
    # the fsyncs (and they would make each save wait on this machine's disk).
    checkpointing = Checkpointing(every_n_steps=1, keep_periodic=2, durable=False, background=True)
    engine = Engine(strategy, config, [history, checkpointing])
    resume = "last" if latest_checkpoint(output_dir / "run") is not None else None
    fitted = engine.fit(model, data(30), resume=resume)
    return {
        "model": model.state_dict(),
        "strategy": strategy.state_dict(),
        "history": without_seconds(fitted.history),
        "callback_history": without_seconds(history.history),
        "steps": fitted.steps,
    }


def worker(output_dir: Path, result: Path) -> None:
    from loguru import logger

    logger.remove()
    torch.save(train(output_dir), result)


def _start(output_dir: Path, result: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, str(output_dir), str(result)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition: object, process: subprocess.Popen[bytes], limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.0005)
    return False


def _saving(checkpoints: Path) -> bool:
    try:
        return any(entry.name.startswith(".staging-") for entry in os.scandir(checkpoints))
    except FileNotFoundError:
        return False


def _has_checkpoint(checkpoints: Path) -> bool:
    return (checkpoints / "last" / "COMPLETE").exists()


def _finish(process: subprocess.Popen[bytes]) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-3000:]


def _kill_seed() -> int:
    """The seed of the kill delays: ``KILL_TEST_SEED`` if set (to repeat a run), else fresh."""
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else random.SystemRandom().randrange(2**32)


@pytest.mark.slow
def test_killed_and_resumed_training_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Each run draws its kill delays from a seed it prints (and names in every failure);
    ``KILL_TEST_SEED=<seed>`` repeats those delays (where the process is when they expire
    still depends on the machine's speed)."""
    seed = _kill_seed()
    print(f"kill delays from seed {seed}: repeat with {SEED_VARIABLE}={seed}")
    expected = train(tmp_path / "reference")
    rng = random.Random(seed)
    output_dir, result = tmp_path / "killed", tmp_path / "killed.pt"
    checkpoints = output_dir / "run" / "checkpoints"
    kills = []
    for attempt in range(2):
        process = _start(output_dir, result)
        started = _wait_for(lambda: _has_checkpoint(checkpoints), process)
        if attempt == 0:  # kill inside a save: while a staging folder exists
            started = _wait_for(lambda: _saving(checkpoints), process)
            moment = "during a save"
        else:
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            moment = f"{delay:.3f}s after the first checkpoint"
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills.append(moment)
        else:
            _finish(process)
        assert started or process.returncode is not None
    assert kills, f"the worker finished before any kill: make its run longer (seed {seed})"
    got = torch.load(result, weights_only=True) if result.exists() else train(output_dir)
    where = f"kills {kills}, seed {seed} ({SEED_VARIABLE}={seed} repeats them)"
    assert got["steps"] == expected["steps"], where
    assert equal(got["model"], expected["model"]), where
    assert equal(got["strategy"], expected["strategy"]), where
    assert got["history"] == expected["history"], where
    assert got["callback_history"] == expected["callback_history"], where


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

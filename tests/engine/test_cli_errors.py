"""The command line in a subprocess, as a user runs it: each mistake is one ``error:`` line and
exit code 2, no traceback, nothing written; Ctrl-C is one line naming the step and the resume
command, exit code 130; a failed resume leaves the run folder byte-identical."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config.file import dump_toml

ROOT = Path(__file__).resolve().parents[2]


def uint8_images(num_samples: int = 32) -> dict[str, torch.Tensor]:
    """Images as a loader hands them out: bytes, not floats (a config's data factory)."""
    generator = torch.Generator().manual_seed(0)
    return {"data": torch.randint(0, 256, (num_samples, 1, 4, 4), generator=generator).byte()}


class SlowModel(torch.nn.Module):
    """A VAE-sized regression that sleeps in every training forward, so Ctrl-C lands mid-run."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():
            time.sleep(0.05)
        x = batch["data"].flatten(1)
        return {"loss": (self.linear(x) - x).pow(2).mean()}


def config(tmp_path: Path, **changes: Any) -> Path:
    """A small VAE run on noise writing under ``tmp_path/runs``; ``changes`` replace sections."""
    raw: dict[str, Any] = {
        "model": {"factory": "examples.models:VAE", "input_shape": [1, 4, 4], "latent_dim": 2},
        "data": {
            "train": {"factory": "examples.data:noise", "num_samples": 32},
            "eval": {"factory": "examples.data:noise", "num_samples": 16, "seed": 1},
        },
        "strategy": {
            "name": "Standard",
            "metrics": ["reconstruction_loss", "reg_loss"],
            "optimizers": {"model": {"name": "Adam", "lr": 1e-3}},
        },
        "engine": {
            "epochs": 1,
            "batch_size": 8,
            "output_dir": (tmp_path / "runs").as_posix(),
            "run_name": "r",
        },
        "callbacks": [{"name": "ProgressBar", "disable": True}],
    }
    raw.update(changes)
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(raw))
    return path


def cli(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "engine", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_of(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def assert_one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _optimizer(**params: Any) -> dict[str, Any]:
    return {"optimizers": {"model": {"name": "Adam", **params}}}


MISTAKES = [
    # (--set overrides, fragments of the one error line)
    (["strategy.optimizers.model.lr=-1"], ["[strategy.optimizers.model]", "lr=-1"]),
    (['strategy.optimizers.model.lr="1e-2"'], ["lr='1e-2'", "without quotes"]),
    (["strategy.optimizers.model.betas=0.9"], ["betas=0.9"]),
    (['strategy.schedulers.model.name="StepLR"'], ["StepLR", "step_size"]),
    (['strategy.metrics=["reconstruction_los"]'], ["reconstruction_los", "keys present"]),
    (['strategy.loss_key="los"'], ["'los'", "keys present"]),
    (['engine.monitor="eval/los"'], ["eval/los", "did you mean 'eval/loss'"]),
    (["engine.seed=1712345678901234567"], ["seed", "1712345678901234567"]),
    (["data.eval.num_samples=0"], ["evaluation data is empty"]),
    (['data.train.factory="tests.engine.test_cli_errors:uint8_images"'], ["uint8", "/ 255"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "fragments"), MISTAKES, ids=lambda v: str(v)[:40])
def test_each_mistake_is_one_error_line_exit_2_and_nothing_written(
    tmp_path: Path, overrides: list[str], fragments: list[str]
) -> None:
    path = config(tmp_path)
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert_one_error_line(cli("fit", str(path), *sets), *fragments)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_plateau_scheduler_on_eval_without_eval_data_is_refused(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        data={"train": {"factory": "examples.data:noise", "num_samples": 32}},
        strategy={
            "name": "Standard",
            "optimizers": {"model": {"name": "Adam"}},
            "schedulers": {"model": {"name": "ReduceLROnPlateau", "monitor": "eval/loss"}},
        },
    )
    assert_one_error_line(cli("fit", str(path)), "model scheduler", "never evaluates")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    done = cli("fit", str(config(tmp_path)))
    assert_one_error_line(done, "output_dir", "is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_evaluate_refuses_a_pickle_as_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(pickle.dumps({"linear.weight": object()}))
    done = cli("evaluate", str(config(tmp_path)), "--weights", str(weights))
    assert_one_error_line(done, "weights.pt", "weights_only")


@pytest.mark.slow
def test_a_failed_resume_leaves_the_run_folder_byte_identical(tmp_path: Path) -> None:
    """The issue's data loss: a resume with a typo used to rewrite config.toml with it."""
    path = config(tmp_path)
    assert cli("fit", str(path)).returncode == 0
    run_dir = tmp_path / "runs" / "r"
    before = files_of(run_dir)
    typo = cli("resume", str(run_dir), "--set", 'strategy.metrics=["reconstruction_los"]')
    assert_one_error_line(typo, "reconstruction_los")
    assert files_of(run_dir) == before
    resumed = cli("resume", str(run_dir), "--set", "engine.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "config.toml").read_bytes() == before["config.toml"]
    assert "epochs = 2" in (run_dir / "config-resume-1.toml").read_text()
    again = cli("resume", str(run_dir), "--set", "engine.epochs=3")  # from resume-1's config
    assert again.returncode == 0, again.stderr
    assert (run_dir / "config-resume-2.toml").is_file()
    assert (run_dir / "config.toml").read_bytes() == before["config.toml"]


@pytest.mark.slow
def test_ctrl_c_is_one_line_with_the_step_and_the_resume_command(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        model={"factory": "tests.engine.test_cli_errors:SlowModel"},
        strategy={"name": "Standard", "optimizers": {"model": {"name": "SGD", "lr": 0.01}}},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "engine", "fit", str(path), "--set", "engine.epochs=1000"]
    with subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        log = tmp_path / "runs" / "r" / "train.log"
        deadline = time.monotonic() + 120
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a few steps in
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "r"
    assert last.startswith("interrupted at step ")
    assert last.endswith(f"; resume with: strategy-engine resume {run_dir}")
    step = int(last.removeprefix("interrupted at step ").split(";")[0])
    assert step > 0


class MultiLineLog:
    """A callback whose log record spans lines (a config's ``[[callbacks]]`` factory)."""

    def on_epoch_end(self, run: Any) -> None:
        run.log.info("first line\nsecond line")
        try:
            raise ValueError("inside\nan error")
        except ValueError:
            run.log.exception("with a traceback")


@pytest.mark.slow
def test_a_run_logged_to_a_file_has_no_progress_bar_and_one_record_per_line(
    tmp_path: Path,
) -> None:
    """Default callbacks (the progress bar included), stderr a pipe as in CI: no carriage-return
    updates there; train.log one timestamped record per line, whatever the messages hold."""
    path = config(
        tmp_path,
        callbacks=[{"name": "tests.engine.test_cli_errors:MultiLineLog"}],
        engine={
            "epochs": 2,
            "batch_size": 8,
            "output_dir": (tmp_path / "runs").as_posix(),
            "run_name": "r",
        },
    )
    done = cli("fit", str(path))
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr  # tqdm's bar (text mode reads its carriage returns as \n)
    lines = (tmp_path / "runs" / "r" / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| ", line) for line in lines)
    assert sum("first line | second line" in line for line in lines) == 2
    assert sum("[ValueError: inside | an error]" in line for line in lines) == 2

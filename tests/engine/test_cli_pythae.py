"""engine/cli: a [pythae] config runs pythae's own JSON files (model config, training config)
through strategies.pythae. The training config sets the run, only the written [engine] keys
override it; the run folder keeps copies of the files, so it resumes, evaluates and exports
alone; bad files are one error line, exit 2, nothing written. Needs the compat extra."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli.main import build, load_run_config, main
from engine.config.file import dump_toml, read_toml

pytest.importorskip("pythae")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
MODEL_CONFIG = CONFIGS / "pythae_vaegan_model_config.json"
TRAINING_CONFIG = CONFIGS / "pythae_vaegan_training_config.json"
TRAIN_FRACTION = 0.9  # eval_fraction of the digits factory: 179 digits to train on


def pythae_config(folder: Path, **engine: Any) -> Path:
    """A run config beside copies of the example's two JSON files, named relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODEL_CONFIG, folder / "model.json")
    shutil.copy(TRAINING_CONFIG, folder / "training.json")
    raw = {
        "pythae": {"model_config": "model.json", "training_config": "training.json"},
        "data": {
            "train": {
                "factory": "examples.data:digits",
                "split": "train",
                "eval_fraction": TRAIN_FRACTION,
            },
            "eval": {"factory": "examples.data:digits", "split": "eval"},
        },
        "engine": {
            "epochs": 1,
            "device": "cpu",
            "output_dir": (folder / "runs").as_posix(),
            "run_name": "run",
            **engine,
        },
        "callbacks": [{"name": "ProgressBar", "disable": True}],
    }
    path = folder / "config.toml"
    path.write_text(dump_toml(raw))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(path)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


def train_size() -> int:
    from examples.data import digits

    return len(digits("train", eval_fraction=TRAIN_FRACTION)["data"])


@pytest.mark.slow
def test_fit_runs_the_pythae_files_for_one_epoch_in_a_subprocess(tmp_path: Path) -> None:
    config = pythae_config(tmp_path / "cfg")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "fit", str(config), "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "cfg" / "runs" / "run"
    assert f"run folder: {run_dir}" in done.stdout
    (record,) = read_jsonl(run_dir / "metrics.jsonl")
    # One epoch of the training config's batches (64 digits each).
    assert record["step"] == math.ceil(train_size() / 64)
    assert {"train/encoder_loss", "train/decoder_loss", "train/discriminator_loss"} <= set(record)
    assert "eval/decoder_loss" in record
    # The run folder holds the files; its config names them, and only the written keys.
    written = read_toml((run_dir / "config.toml").read_text())
    assert written["pythae"] == {
        "model_config": "pythae_model_config.json",
        "training_config": "pythae_training_config.json",
    }
    assert set(written["engine"]) == {"epochs", "device", "output_dir", "run_name"}
    assert (run_dir / "pythae_model_config.json").read_bytes() == MODEL_CONFIG.read_bytes()
    assert (run_dir / "pythae_training_config.json").read_bytes() == TRAINING_CONFIG.read_bytes()
    model = build(load_run_config(run_dir), with_callbacks=False).model
    model.load_state_dict(weights(run_dir / "model_final.pt"))


def test_only_the_written_engine_keys_override_the_training_config(tmp_path: Path) -> None:
    from engine.cli.commands import prepare

    config = load_run_config(pythae_config(tmp_path, batch_size=16, log_every=3))
    engine = prepare(build(config, with_callbacks=False)).engine
    training = json.loads(TRAINING_CONFIG.read_text())
    assert engine.config.batch_size == 16 and engine.config.log_every == 3
    assert engine.config.eval_batch_size == training["per_device_eval_batch_size"]
    assert engine.config.seed == training["seed"]
    strategy = engine.strategy
    assert type(strategy).__name__ == "CoupledAdversarial"
    lrs = {role: spec.params["lr"] for role, spec in strategy_specs(strategy).items()}
    assert lrs == {
        role: training[f"{role}_learning_rate"] for role in ("encoder", "decoder", "discriminator")
    }


def strategy_specs(strategy: Any) -> dict[str, Any]:
    return {role: getattr(strategy, role) for role in ("encoder", "decoder", "discriminator")}


def test_updates_pythae_gives_pythaes_shared_graph_updates(tmp_path: Path) -> None:
    from engine.cli.commands import prepare

    path = pythae_config(tmp_path)
    config = load_run_config(path, ["pythae.updates=pythae", 'pythae.metrics=["recon_loss"]'])
    strategy = prepare(build(config, with_callbacks=False)).engine.strategy
    assert type(strategy).__name__ == "SharedGraphUpdates"
    assert list(strategy.roles) == ["encoder", "decoder", "discriminator"]
    assert tuple(strategy.metrics) == ("recon_loss",)


@pytest.mark.slow
def test_a_resumed_run_reads_its_own_copies_and_ends_as_the_straight_run(tmp_path: Path) -> None:
    """Stopped after one epoch and resumed from its folder (with the config's own files gone)
    for a second one, the run ends bitwise as the run that trained two epochs straight."""
    straight = pythae_config(tmp_path / "a", epochs=2)
    stopped = pythae_config(tmp_path / "b", epochs=1)
    assert main(["fit", str(straight)]) == 0
    assert main(["fit", str(stopped)]) == 0
    for name in ("model.json", "training.json"):
        (tmp_path / "b" / name).unlink()
    run_dir = tmp_path / "b" / "runs" / "run"
    assert main(["resume", str(run_dir), "--set", "engine.epochs=2"]) == 0
    straight_dir = tmp_path / "a" / "runs" / "run"
    assert without_time(straight_dir / "metrics.jsonl") == without_time(run_dir / "metrics.jsonl")
    a, b = weights(straight_dir / "model_final.pt"), weights(run_dir / "model_final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    resumed = read_toml((run_dir / "config-resume-1.toml").read_text())
    assert resumed["pythae"]["model_config"] == "pythae_model_config.json"
    assert sorted(p.name for p in run_dir.glob("pythae_*")) == [
        "pythae_model_config.json",
        "pythae_training_config.json",
    ]


@pytest.mark.slow
def test_evaluate_and_export_pythae_use_the_trained_weights(tmp_path: Path, capsys: Any) -> None:
    from pythae.models import AutoModel

    assert main(["fit", str(pythae_config(tmp_path))]) == 0
    run_dir = tmp_path / "runs" / "run"
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"encoder_loss", "decoder_loss", "discriminator_loss"}
    assert all(math.isfinite(value) for value in metrics.values())
    folder = tmp_path / "exported"
    assert main(["export-pythae", str(run_dir), str(folder)]) == 0
    assert f"pythae model folder: {folder}" in capsys.readouterr().out
    loaded = AutoModel.load_from_folder(str(folder))
    trained = weights(run_dir / "model_final.pt")
    state = loaded.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[key], trained[key]) for key in trained)


BAD_TRAINING = {"name": "BaseTrainerConfig", "num_epochs": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ["pythae.model_config=nothing.json"],
            "pythae.model_config: '{cfg}/nothing.json' does not",
        ),
        (["pythae.training_config=base.json"], "pythae trains a VAEGAN with a CoupledOptimizer"),
        (["pythae.training_config=typo.json"], "has field(s) ['num_epoch'] that Coupled"),
        (["pythae.updates=shared"], "pythae.updates must be one of ['isolated', 'pythae']"),
        (["pythae.model=model.json"], "unknown key(s) ['model'] in [pythae]"),
        (["model.factory=examples.models:VAE"], "the config has [pythae] and ['[model]']"),
        (["pythae.metrics=3"], "pythae.metrics must be a list of output names"),
        (["engine.eval_every=2"], "eval_every=2: pythae evaluates after every epoch"),
        (["engine.epochs=0"], "[engine] epochs must be a positive integer, got 0"),
    ],
)
def test_bad_pythae_input_is_one_line_exit_2_and_no_run(
    change: list[str], message: str, tmp_path: Path, capsys: Any
) -> None:
    folder = tmp_path / "cfg"
    config = pythae_config(folder)
    (folder / "base.json").write_text(json.dumps(BAD_TRAINING))
    typo = json.loads(TRAINING_CONFIG.read_text())
    typo["num_epoch"] = typo.pop("num_epochs")
    (folder / "typo.json").write_text(json.dumps(typo))
    before = sorted(p.name for p in folder.rglob("*"))
    args = [arg for item in change for arg in ("--set", item)]
    assert main(["fit", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(cfg=folder) in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_a_training_config_that_saves_checkpoints_refuses_a_second_checkpointing(
    tmp_path: Path, capsys: Any
) -> None:
    folder = tmp_path / "cfg"
    config = pythae_config(folder)
    training = json.loads(TRAINING_CONFIG.read_text())
    training.update(steps_saving=1, output_dir=(folder / "runs").as_posix())
    (folder / "training.json").write_text(json.dumps(training))
    raw = read_toml(config.read_text())
    raw["callbacks"].append({"name": "Checkpointing"})
    config.write_text(dump_toml(raw))
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "steps_saving=1" in err and "callbacks.1" in err and err.count("\n") == 1


def test_a_resume_given_another_file_keeps_the_runs_copy_and_adds_its_own(tmp_path: Path) -> None:
    from engine.cli.commands import copy_into_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert copy_into_run(run_dir, "training_config", TRAINING_CONFIG, 1) == (
        "pythae_training_config.json"
    )
    own = run_dir / "pythae_training_config.json"
    assert copy_into_run(run_dir, "training_config", own, 1) == own.name  # a resume: kept
    other = tmp_path / "other.json"
    other.write_text(TRAINING_CONFIG.read_text().replace('"num_epochs": 10', '"num_epochs": 3'))
    name = copy_into_run(run_dir, "training_config", other, 2)
    assert name == "pythae_training_config-resume-2.json"
    assert own.read_bytes() == TRAINING_CONFIG.read_bytes()
    assert (run_dir / name).read_bytes() == other.read_bytes()
    saved = tmp_path / "saved_model"
    saved.mkdir()
    (saved / "model_config.json").write_text("{}")
    assert copy_into_run(run_dir, "model_config", saved, 1) == "pythae_model"
    assert (run_dir / "pythae_model" / "model_config.json").read_text() == "{}"

"""engine/cli/main.py: every example config trains for one short epoch, overrides, re-running the
written config, evaluate and predict, and bad configs as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import ConfigError
from engine.cli.main import build, load_run_config, main
from engine.config.file import dump_toml, read_toml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.toml"))
# One short epoch: 10% of the digits to train on, a few batches, no progress bar.
SHORT = [
    "engine.epochs=1",
    "data.train.eval_fraction=0.9",
    "engine.log_every=1",
    'engine.run_name="run"',
]
# A short run has a handful of optimiser windows: settings counted in windows must fit in it
# (pre-flight refuses a disc_start beyond the run).
SHORT_RUN_OVERRIDES = {"vqgan_digits": ("strategy.disc_start=2",)}


def short(tmp_path: Path, *extra: str) -> list[str]:
    sets = [*SHORT, f'engine.output_dir="{tmp_path.as_posix()}"', *extra]
    return [arg for item in sets for arg in ("--set", item)]


def small_config(tmp_path: Path) -> Path:
    """A VAE on 64 noise images, writing under tmp_path: fast enough for many runs."""
    raw = {
        "model": {"factory": "examples.models:VAE", "input_shape": [1, 4, 4], "latent_dim": 2},
        "data": {
            "train": {"factory": "examples.data:noise", "num_samples": 64},
            "eval": {"factory": "examples.data:noise", "num_samples": 32, "seed": 1},
        },
        "strategy": {"name": "Standard", "optimizers": {"model": {"name": "Adam", "lr": 1e-3}}},
        "engine": {"epochs": 2, "batch_size": 16, "output_dir": str(tmp_path), "run_name": "r"},
        "callbacks": [{"name": "ProgressBar", "disable": True}],
    }
    path = tmp_path / "small.toml"
    path.write_text(dump_toml(raw))
    return path


def read_jsonl(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_example_config_trains_one_short_epoch(config: Path, tmp_path: Path) -> None:
    if "[pythae]" in config.read_text():
        pytest.importorskip("pythae")
    extra = SHORT_RUN_OVERRIDES.get(config.stem, ())
    assert main(["fit", str(config), *short(tmp_path, *extra)]) == 0
    run_dir = tmp_path / "run"
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert len(history) == 1 and history[0]["epoch"] == 0
    assert all(key in history[0] for key in ("seconds", "step"))
    written = read_toml((run_dir / "config.toml").read_text())
    assert written["engine"]["epochs"] == 1
    assert written["data"]["train"]["eval_fraction"] == 0.9
    model = build(load_run_config(run_dir), with_callbacks=False).model
    model.load_state_dict(torch.load(run_dir / "model_final.pt", weights_only=True))
    assert (run_dir / "plots").is_dir()


def test_written_config_repeats_the_run(tmp_path: Path, capsys: Any) -> None:
    config = small_config(tmp_path)
    assert main(["fit", str(config), "--set", "engine.epochs=2"]) == 0
    first = tmp_path / "r"
    assert f"run folder: {first}" in capsys.readouterr().out
    written = read_toml((first / "config.toml").read_text())
    assert written["engine"]["epochs"] == 2
    assert main(["fit", str(first / "config.toml")]) == 0
    second = tmp_path / "r-1"  # two runs never share a folder
    assert (first / "config.toml").read_text() == (second / "config.toml").read_text()

    assert len(read_jsonl(first / "metrics.jsonl")) == 2
    assert without_time(first / "metrics.jsonl") == without_time(second / "metrics.jsonl")
    a = torch.load(first / "model_final.pt", weights_only=True)
    b = torch.load(second / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def without_time(path: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(path)]


def test_resume_continues_the_run_as_if_never_stopped(tmp_path: Path) -> None:
    """Early stopping (in "max" mode a falling loss never improves) stops both runs after their
    second epoch: the resumed one only if its counters came back from the checkpoint."""
    config = small_config(tmp_path)
    raw = read_toml(config.read_text())
    stopper = {"name": "EarlyStopping", "monitor": "train/loss", "mode": "max", "patience": 1}
    raw["callbacks"].append(stopper)
    config.write_text(dump_toml(raw))
    assert main(["fit", str(config), "--set", "engine.epochs=4", "--set", "engine.run_name=a"]) == 0
    assert main(["fit", str(config), "--set", "engine.epochs=1", "--set", "engine.run_name=b"]) == 0
    assert main(["resume", str(tmp_path / "b"), "--set", "engine.epochs=4"]) == 0
    history = without_time(tmp_path / "a" / "metrics.jsonl")
    assert len(history) == 2
    assert history == without_time(tmp_path / "b" / "metrics.jsonl")
    # A resume never rewrites config.toml: its overrides went to config-resume-1.toml.
    assert read_toml((tmp_path / "b" / "config.toml").read_text())["engine"]["epochs"] == 1
    resumed = read_toml((tmp_path / "b" / "config-resume-1.toml").read_text())
    assert resumed["engine"]["epochs"] == 4
    a = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_refused_by_the_checkpoint_leaves_the_run_folder_as_it_was(
    tmp_path: Path, capsys: Any
) -> None:
    config = small_config(tmp_path)
    assert main(["fit", str(config), "--set", "engine.epochs=1"]) == 0
    run_dir = tmp_path / "r"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--set", "engine.batch_size=7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "batch_size" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_without_a_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys: Any) -> None:
    config = small_config(tmp_path)
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config.read_text())
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint" in err and "copy" in err


def test_evaluate_and_predict_use_the_trained_weights(tmp_path: Path, capsys: Any) -> None:
    config = small_config(tmp_path)
    assert main(["fit", str(config)]) == 0
    run_dir = tmp_path / "r"
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last_eval = read_jsonl(run_dir / "metrics.jsonl")[-1]["eval/loss"]
    assert set(metrics) == {"loss"}
    assert metrics["loss"] == pytest.approx(last_eval, rel=0.2)  # the VAE samples z
    output = tmp_path / "p.pt"
    assert main(["predict", str(config), "--weights", str(run_dir / "model_final.pt"),
                 "--output", str(output), "--split", "train"]) == 0  # fmt: skip
    predictions = torch.load(output, weights_only=True)
    assert predictions["recon_x"].shape == (64, 1, 4, 4)
    assert predictions["z"].shape == (64, 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "{config}"], "is a config file: give --weights PATH"),
        (["evaluate", "{config}", "--weights", "{tmp}/none.pt"], "no weights file at"),
        (["predict", "{config}", "--weights", "{tmp}/w.pt"], "predict needs --output FILE"),
        (["resume", "{tmp}"], "resume needs a run folder holding config.toml"),
        (["fit", "{config}", "--threads", "0"], "--threads must be a positive integer, got 0"),
        (["fit", "{config}", "--set", "strategy.optimizer=1"], "[strategy] sets ['optimizer']"),
        (["fit", "{tmp}/missing.toml"], "can not read config file"),
        (["fit", "{config}", "--set", "engine.epochs=0"], "epochs must be a positive integer"),
        (["fit", "{config}", "--set", "strategy.name=Magic"], "'Magic' is not a strategy"),
        (["fit", "{config}", "--set", "callbacks.0.name=Nope"], "'Nope' is not a callback"),
        (["fit", "{config}", "--set", "callbacks.0.speed=2"], "speed"),
        (["fit", "{config}", "--set", "strategy.optimizers.critic.name=Adam"], "role(s) ['model']"),
        (["fit", "{config}", "--set", "model.latent_dim=-1"], "[model] examples.models:VAE("),
        (["fit", "{config}", "--set", 'data.train.shape="x"'], "[data.train]"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(
    argv: list[str], message: str, tmp_path: Path, capsys: Any
) -> None:
    config = small_config(tmp_path)
    torch.save({}, tmp_path / "w.pt")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(config=config, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_python_dash_m_engine_reports_a_bad_config_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nfactory = "examples.models:VAE"\nwidth = 3\n[data.train]\n'
                   'factory = "examples.data:noise"\n[strategy]\nname = "Standard"\n'
                   '[strategy.optimizers.model]\nname = "Adam"\n')  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "fit", str(bad)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "width" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- malformed


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


_junk = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=6),
        st.sampled_from(["examples.models:VAE", "Adam", "nope:x", "cpu", "eval/loss"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=2), st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=4,
)  # fmt: skip


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_malformed_configs_fail_with_our_error_before_training(
    data: Any, tmp_path: Path, capsys: Any
) -> None:
    """Replace, delete or add one value anywhere in a valid config. Checking and building it
    either succeed or raise ConfigError, never anything else. The CLI then either trains it (a
    short run: ``engine.max_steps=2``), exit 0, or refuses it with exactly one ``error:`` line,
    exit 2, no traceback and nothing written; whatever building refused, the CLI refuses."""
    raw: dict[str, Any] = json.loads(json.dumps(VALID))
    # The CLI run below overrides these two keys itself: a bad value there would be replaced.
    overridden = {("engine", "output_dir"), ("engine", "max_steps")}
    paths = [path for path in _paths(raw) if tuple(path) not in overridden]
    path = data.draw(st.sampled_from(paths))
    parent: Any = raw
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(_junk)
    elif action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(_junk)
    from engine.config.file import resolve_config

    try:
        build(resolve_config(raw))
        refused_by_build = False
    except ConfigError:
        refused_by_build = True
    case = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    case.mkdir()
    config_path = case / "malformed.json"
    config_path.write_text(json.dumps(raw))
    out = case / "out"
    capsys.readouterr()
    code = main(
        ["fit", str(config_path), "--set", "engine.max_steps=2",
         "--set", f'engine.output_dir="{out.as_posix()}"']
    )  # fmt: skip
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert not refused_by_build, f"built with ConfigError, but the CLI trained {raw}"
        return
    assert code == 2, f"exit {code} for {raw}: {err[-2000:]}"
    assert err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists(), f"a refused config wrote {sorted(out.rglob('*'))}"


VALID = {
    "model": {"factory": "examples.models:VAE", "input_shape": [1, 4, 4], "latent_dim": 2},
    "data": {
        "train": {"factory": "examples.data:noise", "num_samples": 32},
        "eval": {"factory": "examples.data:noise", "num_samples": 16},
    },
    "strategy": {
        "name": "Standard",
        "metrics": ["reg_loss"],
        "optimizers": {"model": {"name": "Adam", "lr": 1e-3}},
        "schedulers": {"model": {"name": "StepLR", "step_size": 2, "interval": "epoch"}},
    },
    "engine": {"epochs": 1, "batch_size": 8, "output_dir": None},
    "callbacks": [
        {"name": "EarlyStopping", "monitor": "eval/loss", "patience": 2},
        {"name": "ProgressBar", "disable": True},
    ],
}


def test_importing_the_engine_and_its_cli_loads_no_strategy_callback_or_tracker() -> None:
    code = (
        "import sys, engine, engine.cli.main; "
        "print(sorted(m for m in ('strategies', 'callbacks', 'matplotlib', 'tensorboard', "
        "'mlflow', 'wandb') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]"


def test_callbacks_that_show_images_get_the_first_eval_samples(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(tmp_path)
    raw = read_toml(config.read_text())
    raw["callbacks"] += [{"name": "TensorBoard"}, {"name": "Plots", "dpi": 20}]
    config.write_text(dump_toml(raw))
    assert main(["fit", str(config), "--set", "engine.epochs=1"]) == 0
    accumulator = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    (inputs,) = accumulator.Images("images/inputs")
    assert (inputs.width, inputs.height) == (8 * 5 - 1, 2 * 5 - 1)  # 16 samples, 8 per row
    assert (tmp_path / "r" / "plots" / "images.png").is_file()

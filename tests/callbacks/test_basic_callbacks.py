"""ProgressBar, ConsoleMetrics and MetricsHistory on real runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import ConsoleMetrics, MetricsHistory, ProgressBar
from engine import Engine, EngineConfig, Event, OptimizerSpec
from strategies import Standard
from tests.helpers import TinyRegressor


def _fit(callbacks: list, tmp_path: Path | None = None, **config: object):  # type: ignore[no-untyped-def]
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.05)),
        EngineConfig(output_dir=tmp_path, **config),
        callbacks,
    )  # type: ignore[arg-type]
    return engine.fit(TinyRegressor(), torch.randn(20, 4), torch.randn(6, 4))


@settings(max_examples=8, deadline=None)
@given(epochs=st.integers(1, 4))
def test_metrics_history_writes_one_json_line_per_epoch(epochs: int, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    tmp_path = tmp_path_factory.mktemp("history")
    history = MetricsHistory()
    result = _fit([history], tmp_path, epochs=epochs, batch_size=4)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == epochs == len(history.history)
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert records[-1]["step"] == 5 * epochs
    assert records == history.history
    assert result.paths["metrics"] == result.run_dir / "metrics.jsonl"


def test_metrics_history_state_round_trip() -> None:
    history = MetricsHistory()
    _fit([history], None, epochs=2, batch_size=4)
    restored = MetricsHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.history == history.history


def test_console_metrics_logs_one_line_per_epoch_into_train_log(tmp_path: Path) -> None:
    result = _fit([ConsoleMetrics()], tmp_path, epochs=3, batch_size=4)
    lines = [
        line for line in (result.run_dir / "train.log").read_text().splitlines() if "epoch " in line
    ]
    assert len(lines) == 3
    assert "epoch 3/3" in lines[-1] and "train/loss=" in lines[-1] and "eval/loss=" in lines[-1]
    assert "lr/model=0.05" in lines[-1] and "seconds=" in lines[-1]


def test_progress_bar_shows_the_interval_loss(capsys) -> None:  # type: ignore[no-untyped-def]
    bar = ProgressBar(leave=True, disable=False)  # drawn although stderr is no terminal here
    seen: list[dict] = []
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.05)),
        EngineConfig(output_dir=None, batch_size=4, log_every=2),
        [bar],
    )
    engine.on(Event.BATCH_END, lambda run: seen.append(dict(run.logged_metrics)))
    engine.fit(TinyRegressor(), torch.randn(20, 4))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "5/5" in err and "loss=" in err
    assert seen[0] == {} and set(seen[1]) == {"loss"}  # refreshed at the log interval only


def test_progress_bar_is_silent_off_the_main_process(capsys) -> None:  # type: ignore[no-untyped-def]
    bar = ProgressBar()
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.05)), EngineConfig(output_dir=None, batch_size=4), [bar]
    )
    engine.on(Event.FIT_START, lambda run: setattr(run, "is_main_process", False), priority=100)
    engine.fit(TinyRegressor(), torch.randn(8, 4))
    assert "epoch 1/1" not in capsys.readouterr().err


def test_resumed_run_rewrites_metrics_jsonl_without_repeated_epochs(tmp_path: Path) -> None:
    from callbacks import Checkpointing

    def engine(epochs: int) -> Engine:
        return Engine(
            Standard(OptimizerSpec("SGD", lr=0.05)),
            EngineConfig(output_dir=tmp_path, run_name="r", epochs=epochs, batch_size=4),
            [MetricsHistory(), Checkpointing(every_n_epochs=1)],
        )

    data = torch.randn(8, 4)
    first = engine(3).fit(TinyRegressor(), data)
    # pretend the run was killed after epoch 3's line was written but resume from epoch 2
    checkpoints = sorted((first.run_dir / "checkpoints").glob("epoch-*"))
    resumed = engine(4).fit(TinyRegressor(), data, resume=checkpoints[1])
    records = [
        json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]


def test_a_second_fit_starts_an_empty_history() -> None:
    history = MetricsHistory()
    _fit([history], None, epochs=2, batch_size=4)
    _fit([history], None, epochs=1, batch_size=4)
    assert len(history.history) == 1

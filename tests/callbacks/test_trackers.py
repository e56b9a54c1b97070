"""callbacks/tensorboard.py, mlflow.py, wandb.py and lr_monitor.py: what each tracker wrote is
read back with the tracker's own reader and holds the logged values."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from callbacks import MetricsHistory, MLflow, TensorBoard, WandB
from callbacks.lr_monitor import LearningRateMonitor
from engine import Engine, EngineConfig, FitResult, OptimizerSpec, SchedulerSpec
from engine.state import RunState
from examples.models import VAE
from strategies import Standard


class StepLog:
    """Keeps every interval's ``logged_metrics`` with its step."""

    priority = -1

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step % run.config.log_every == 0:
            self.logged[run.progress.step] = dict(run.logged_metrics)


def images(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))}


def fit(tmp_path: Path, callbacks: list[Any], model: Any = None) -> tuple[FitResult, StepLog]:
    """2 epochs of 4 batches, logging every 2 steps, a per-step scheduler."""
    steps = StepLog()
    engine = Engine(
        Standard(
            OptimizerSpec("Adam", lr=1e-2),
            scheduler=SchedulerSpec("StepLR", interval="step", step_size=1, gamma=0.5),
        ),
        EngineConfig(epochs=2, batch_size=8, log_every=2, output_dir=tmp_path, run_name="run"),
        callbacks=[*callbacks, LearningRateMonitor(), steps],
    )
    model = model or VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=8)
    return engine.fit(model, images(32, 0), images(8, 1)), steps


def test_tensorboard_event_files_hold_the_scalars_and_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, steps = fit(tmp_path, [TensorBoard(image_batch=images(4, 2), num_samples=4)])
    accumulator = EventAccumulator(
        str(result.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    accumulator.Reload()
    for key in ("train/loss", "eval/loss", "lr/model"):
        events = accumulator.Scalars(key)
        assert [e.step for e in events] == [4, 8]
        assert [e.value for e in events] == pytest.approx([h[key] for h in result.history])
    for key in ("loss", "lr/model"):
        events = accumulator.Scalars(f"step/{key}")
        assert [e.step for e in events] == [2, 4, 6, 8]
        assert [e.value for e in events] == pytest.approx(
            [steps.logged[s][key] for s in (2, 4, 6, 8)]
        )
    assert [e.value for e in accumulator.Scalars("step/lr/model")] == pytest.approx(
        [1e-2 * 0.5**2, 1e-2 * 0.5**4, 1e-2 * 0.5**6, 1e-2 * 0.5**8]
    )
    for name in ("inputs", "reconstructions", "samples"):
        pictures = accumulator.Images(f"images/{name}")
        assert [p.step for p in pictures] == [4, 8]
        assert pictures[0].width == 4 * 5 - 1 and pictures[0].height == 4
    assert result.paths["tensorboard"] == result.run_dir / "tensorboard"


@pytest.mark.slow
def test_mlflow_store_holds_params_metrics_artifacts_and_status(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MLflow(experiment="tests", params={"note": "hello"})
    result, steps = fit(tmp_path, [tracker, MetricsHistory()])
    client = MlflowClient(tracking_uri=f"sqlite:///{result.run_dir.resolve() / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["engine.epochs"] == "2"
    assert run.data.params["model"] == "VAE" and run.data.params["note"] == "hello"
    for key in ("train/loss", "eval/loss", "lr/model"):
        history = client.get_metric_history(tracker.run_id, key)
        assert [m.step for m in history] == [4, 8]
        assert [m.value for m in history] == pytest.approx([h[key] for h in result.history])
    per_step = client.get_metric_history(tracker.run_id, "step/loss")
    assert [m.value for m in per_step] == pytest.approx(
        [steps.logged[s]["loss"] for s in (2, 4, 6, 8)]
    )
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"metrics.jsonl", "train.log"} <= artifacts


class FailsAtStep3(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 1)
        self.calls = 0

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return {"loss": self.linear(batch["data"].flatten(1)).pow(2).mean()}


@pytest.mark.slow
def test_mlflow_run_ends_failed_on_an_exception(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MLflow()
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [tracker], model=FailsAtStep3())
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def read_wandb_history(path: Path) -> dict[int, dict[str, str]]:
    """History records of an offline ``.wandb`` file (LevelDB-log framing of protobuf
    records, 32 KiB blocks, 7-byte headers), read with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, buffer, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        buffer += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(buffer)
            buffer = b""
    history: dict[int, dict[str, str]] = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): item.value_json
                for item in record.history.item
            }
            history.setdefault(record.history.step.num, {}).update(items)
    return history


@pytest.mark.slow
def test_wandb_offline_run_directory_holds_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = WandB(project="tests", mode="offline")
    result, steps = fit(tmp_path, [tracker])
    assert tracker.run_dir is not None and tracker.run_dir.parent == result.run_dir / "wandb"
    assert tracker.run_dir.name.startswith("offline-run-")
    (log,) = tracker.run_dir.glob("run-*.wandb")
    wandb.teardown()  # W&B's service writes the offline file out when it shuts down
    history = read_wandb_history(log)
    for epoch, record in enumerate(result.history):
        logged = history[4 * (epoch + 1)]
        for key in ("train/loss", "eval/loss", "lr/model"):
            assert float(logged[key]) == pytest.approx(record[key])
    assert float(history[2]["step/loss"]) == pytest.approx(steps.logged[2]["loss"])


@pytest.mark.parametrize(
    ("factory", "module", "extra"),
    [
        (TensorBoard, "tensorboard", "tensorboard"),
        (MLflow, "mlflow", "mlflow"),
        (WandB, "wandb", "wandb"),
    ],
)
def test_a_missing_package_names_the_extra_to_install(
    factory: Any, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'strategy-engine\[{extra}\]'"):
        factory()


@pytest.mark.parametrize("factory", [TensorBoard, MLflow, WandB])
def test_only_rank_0_writes(factory: Any, tmp_path: Path) -> None:
    tracker = factory()
    run: Any = SimpleNamespace(
        is_main_process=False,
        run_dir=tmp_path,
        progress=SimpleNamespace(step=2, epoch=1),
        config=EngineConfig(log_every=1),
        logged_metrics={"loss": 1.0},
        epoch_metrics={"train/loss": 1.0},
        history=[{"train/loss": 1.0}],
        paths={},
        exception=None,
    )
    for event in ("on_fit_start", "on_batch_end", "on_epoch_end", "on_fit_end"):
        getattr(tracker, event)(run)
    assert list(tmp_path.iterdir()) == [] and run.paths == {}


def test_a_tracker_without_a_folder_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    from engine import ConfigError

    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-3)),
        EngineConfig(epochs=1, batch_size=8, output_dir=None),
        callbacks=[TensorBoard()],
    )
    with pytest.raises(ConfigError, match=r"TensorBoard needs a folder: give log_dir=.*None"):
        engine.fit(VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=8), images(8, 0))


def test_tracker_params_hold_the_cli_run_config_flattened() -> None:
    from callbacks.mlflow import flatten_params, run_params

    run: Any = SimpleNamespace(
        config=EngineConfig(epochs=3),
        strategy=Standard(OptimizerSpec("Adam", lr=1e-3)),
        model=VAE(),
        extra={"run_config": {"model": {"factory": "examples.models:VAE", "latent_dim": 8}}},
    )
    params = flatten_params(run_params(run, {"note": [1, 2]}))
    assert params["config.model.factory"] == "examples.models:VAE"
    assert params["config.model.latent_dim"] == "8"
    assert params["engine.epochs"] == "3" and params["strategy"] == "Standard"
    assert params["note"] == "[1, 2]" and "engine.max_steps" not in params

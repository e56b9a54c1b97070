"""MLflow: parameters, metrics per log interval and per epoch, and the run folder's files as
artifacts, through ``MlflowClient`` (optional extra ``strategy-engine[mlflow]``).

By default the store is a SQLite file in the run folder (``run_dir/mlflow.db``, artifacts in
``run_dir/mlartifacts``): local, and readable with ``MlflowClient("sqlite:///.../mlflow.db")``
or ``mlflow ui --backend-store-uri ...``. MLflow 3 refuses its older plain-folder store unless an
environment variable opts in, which a library should not set for its user.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from callbacks.extras import require_extra
from callbacks.tracking import interval_metrics
from engine.config.validators import non_empty_str
from engine.errors import ConfigError
from engine.state import RunState

# MLflow caps a parameter value at 6000 characters.
_MAX_PARAM_LENGTH = 6000


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"a.b": "value"}`` strings, the shape trackers take params in."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif value is not None:
            flat[name] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


def run_params(run: RunState, extra: Mapping[str, Any]) -> dict[str, Any]:
    """What trackers record as a run's parameters: the engine config, the strategy's class and
    the model's class, the run config the CLI resolved (``run.extra["run_config"]``, when the
    run came from a config file) and whatever the user adds."""
    params: dict[str, Any] = {
        "engine": run.config.to_dict(),
        "strategy": type(run.strategy).__name__,
        "model": type(run.model).__name__,
    }
    if "run_config" in run.extra:
        params["config"] = run.extra["run_config"]
    params.update(extra)
    return params


@attrs.define(eq=False)
class MLflow:
    """One MLflow run per fit, on rank 0 only; no set-up call is needed.

    At FIT_START: the run is created under ``experiment`` and the params logged. Every
    ``log_every`` steps: ``step/<metric>``; every epoch: every epoch metric; all at the global
    step. At FIT_END: every file in the run folder (not sub-folders other than ``plots``) is
    logged as an artifact and the run ends FINISHED; on an exception it ends FAILED.
    """

    tracking_uri: str | None = None
    experiment: str = attrs.field(default="strategy-engine", validator=non_empty_str)
    run_name: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    log_artifacts: bool = True
    priority: int = 0
    run_id: str | None = attrs.field(default=None, init=False)
    _client: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        require_extra("mlflow", "mlflow", "The MLflow callback")

    def on_fit_start(self, run: RunState) -> None:
        if not run.is_main_process:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = self._locations(run)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(self.experiment, artifact_location=artifacts)
        )
        name = self.run_name or (run.run_dir.name if run.run_dir is not None else None)
        self.run_id = client.create_run(experiment_id, run_name=name).info.run_id
        params = flatten_params(run_params(run, self.params))
        items = [Param(key, value) for key, value in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=items[start : start + 100])
        self._client = client
        if run.run_dir is not None:
            run.paths["mlflow"] = (
                run.run_dir / "mlflow.db" if self.tracking_uri is None else run.run_dir
            )

    def _locations(self, run: RunState) -> tuple[str, str | None]:
        if self.tracking_uri is not None:
            return self.tracking_uri, None
        if run.run_dir is None:
            raise ConfigError(
                "MLflow needs a store: give tracking_uri=... or set EngineConfig.output_dir "
                f"(output_dir={run.config.output_dir!r})"
            )
        folder = run.run_dir.resolve()
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri()

    def on_batch_end(self, run: RunState) -> None:
        metrics = interval_metrics(run)
        if self._client is not None and metrics is not None:
            self._log(metrics, run.progress.step)

    def on_epoch_end(self, run: RunState) -> None:
        if self._client is not None:
            self._log(run.epoch_metrics, run.progress.step)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def on_fit_end(self, run: RunState) -> None:
        if self._client is None:
            return
        if self.log_artifacts and run.run_dir is not None:
            for path in _artifact_files(run.run_dir):
                folder = path.parent.relative_to(run.run_dir).as_posix()
                self._client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        self._end("FINISHED")

    def on_exception(self, run: RunState) -> None:
        self._end("KILLED" if isinstance(run.exception, KeyboardInterrupt) else "FAILED")

    def _end(self, status: str) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status)
            self._client = None


def _artifact_files(run_dir: Path) -> list[Path]:
    files = [
        path
        for path in run_dir.iterdir()
        if path.is_file() and not path.name.startswith("mlflow.db")
    ]
    plots = run_dir / "plots"
    if plots.is_dir():
        files.extend(path for path in plots.iterdir() if path.is_file())
    return sorted(files)

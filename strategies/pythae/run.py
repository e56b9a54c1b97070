"""The one call: a pythae model and its training config become a ready ``Engine``.

::

    from strategies.pythae import from_pythae

    run = from_pythae(model, training_config, train_data, eval_data)   # updates="isolated"
    result = run.fit()                        # or run.engine.fit(**run.fit_args)
    run.export("trained/")                    # pythae.models.AutoModel.load_from_folder reads it

The trainer, hence the strategy, is the one pythae's ``TrainingPipeline`` picks; every field of
the training config is mapped as ``strategies/pythae/mapping.py`` lists. The run passes
``epoch``, ``dataset_size`` and ``uses_ddp`` to ``forward``, calls ``model.update()`` after each
epoch's training, sets ``model.device``, and evaluates with gradients the models whose loss
needs them (HVAE, RHVAE, RAE_GP), all as pythae's ``BaseTrainer`` does.

``updates="isolated"`` (default) back-propagates each loss into its own parameter group only;
``updates="pythae"`` reproduces pythae's multi-optimiser trainers exactly
(``SharedGraphUpdates``), leaked gradients included. A single-optimiser model trains the same
under both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch.utils.data import Dataset

from callbacks.checkpointing import Checkpointing
from engine.errors import ConfigError
from engine.events import Event
from engine.loop import Engine
from engine.state import FitResult
from strategies.pythae.export import export_to_pythae
from strategies.pythae.forward import PythaeForward, update_model
from strategies.pythae.mapping import (
    TrainerLayout,
    Updates,
    build_strategy,
    choose_trainer,
    engine_config,
    model_name,
    role_specs,
)
from strategies.pythae.version import import_pythae

# Flows that pythae's trainers take as they are; every other flow trains inside NFModel.
_BARE_FLOWS = frozenset({"PixelCNN"})


@attrs.define(eq=False)
class PythaeRun:
    """What ``from_pythae`` returns: the engine, and the model and data its ``fit`` takes.

    ``trainer`` names the pythae trainer this run reproduces and ``training_config`` is the
    config as pythae's pipeline would use it (RAE_L2's decoder weight decay filled in).
    """

    engine: Engine
    model: torch.nn.Module
    train: Any
    eval: Any
    forward: PythaeForward
    layout: TrainerLayout
    training_config: Any

    @property
    def trainer(self) -> str:
        return self.layout.trainer

    @property
    def fit_args(self) -> dict[str, Any]:
        """``engine.fit(**run.fit_args)`` is ``run.fit()``."""
        return {"model": self.model, "train": self.train, "eval": self.eval}

    def fit(self, resume: str | os.PathLike[str] | None = None) -> FitResult:
        return self.engine.fit(self.model, self.train, self.eval, resume=resume)

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """The mean losses on ``data`` (default: the run's evaluation data, else its training
        data), with ``dataset_size`` the size of that data, as pythae passes it."""
        chosen = as_pythae_data(data, "data") if data is not None else self.eval
        if chosen is None:
            chosen = self.train
        previous = self.forward.eval_size
        self.forward.eval_size = data_size(chosen)
        try:
            return self.engine.evaluate(self.model, chosen)
        finally:
            self.forward.eval_size = previous

    def export(self, folder: str | os.PathLike[str]) -> Path:
        """The model as pythae saves it (see ``export_to_pythae``)."""
        return export_to_pythae(self.model, folder)


def from_pythae(
    model: torch.nn.Module,
    training_config: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    *,
    updates: Updates = "isolated",
    callbacks: Iterable[Any] = (),
    metrics: tuple[str, ...] = (),
    overrides: Mapping[str, Any] | None = None,
) -> PythaeRun:
    """A ready run that trains ``model`` as pythae's ``TrainingPipeline(model,
    training_config)(train_data, eval_data)`` would.

    ``model``: a ``pythae.models`` model (a normalizing flow inside ``NFModel(prior, flow)``,
    or a ``PixelCNN``). ``training_config``: one of pythae's ``BaseTrainerConfig``,
    ``AdversarialTrainerConfig``, ``CoupledOptimizerTrainerConfig``,
    ``CoupledOptimizerAdversarialTrainerConfig``, or None for the pipeline's default.
    ``train_data``/``eval_data``: arrays or tensors (checked and converted by pythae's
    ``DataProcessor``, batched as ``{"data": x}``) or a pythae ``BaseDataset`` (any ``Dataset``
    of ``{"data": ...}`` samples). ``updates``: ``"isolated"`` or ``"pythae"`` (see the module
    docstring). ``callbacks`` are added to the engine's; ``metrics`` names further scalar outputs
    to log (e.g. ``("recon_loss",)``); ``overrides`` replaces mapped ``EngineConfig`` fields
    (e.g. ``{"shuffle": False, "output_dir": None}``).

    Bad input is a ``ConfigError`` naming the value: an unsupported pythae version, a config
    whose trainer does not fit the model, a model pythae can not train (a flow outside
    ``NFModel``, MADE).
    """
    import_pythae()
    _check_model(model)
    if train_data is None:
        raise ConfigError("from_pythae needs train_data (pythae's pipeline needs it too)")
    train = as_pythae_data(train_data, "train_data")
    evaluation = None if eval_data is None else as_pythae_data(eval_data, "eval_data")
    layout, config = choose_trainer(model, training_config)
    has_eval = evaluation is not None
    specs = role_specs(layout, config, has_eval)
    strategy = build_strategy(layout, specs, updates, tuple(metrics))
    engine_settings = engine_config(config, model, layout, has_eval, overrides or {})
    extra: list[Any] = []
    if config.steps_saving is not None:
        extra.append(Checkpointing(every_n_epochs=config.steps_saving))
    forward = PythaeForward(
        train_size=data_size(train),
        eval_size=None if evaluation is None else data_size(evaluation),
    )
    engine = Engine(strategy, engine_settings, [*extra, *callbacks], forward=forward)
    engine.on(Event.FIT_START, forward.start_fit)
    engine.on(Event.EPOCH_START, forward.start_epoch)
    engine.on(Event.EVAL_START if has_eval else Event.EPOCH_END, update_model)
    return PythaeRun(engine, model, train, evaluation, forward, layout, config)


def _check_model(model: Any) -> None:
    from pythae.models.normalizing_flows import MADE, BaseNF, NFModel

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a pythae model (a torch.nn.Module), got {model!r}")
    flow = model.flow if isinstance(model, NFModel) else model
    if isinstance(flow, MADE):
        raise ConfigError(
            "pythae can not train MADE: its forward returns mu and log_var, no loss "
            "(NFModel(prior, MADE) fails the same way); train MAF or IAF, which are built on it"
        )
    if isinstance(model, BaseNF) and model_name(model) not in _BARE_FLOWS:
        raise ConfigError(
            f"a {model_name(model)} flow trains inside NFModel, as with pythae's trainers: "
            "from_pythae(NFModel(prior, flow), ...), e.g. prior = "
            "torch.distributions.MultivariateNormal(torch.zeros(d), torch.eye(d))"
        )
    model_name(model)


def as_pythae_data(data: Any, name: str) -> Any:
    """Arrays and tensors as ``{"data": x}`` (pythae's ``DataProcessor`` checks them and makes
    them float); a ``Dataset`` as it is."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        from pythae.data.preprocessors import DataProcessor

        return {"data": DataProcessor().process_data(data)}
    if isinstance(data, Mapping) and isinstance(data.get("data"), torch.Tensor):
        return dict(data)
    if isinstance(data, Dataset):
        return data
    raise ConfigError(
        f"{name} must be a numpy array, a tensor, {{'data': tensor}} or a pythae BaseDataset, "
        f"got {type(data).__name__}"
    )


def data_size(data: Any) -> int:
    """The number of samples, as pythae's ``len(loader.dataset)``."""
    if isinstance(data, Mapping):
        return int(data["data"].shape[0])
    return len(data)

"""pythae's files as a run's inputs: a model config JSON (or a saved model folder) and a
training config JSON, exactly as pythae writes them (``config.save_json``, ``model.save``).

``load_from_json(model_config_path, training_config_path)`` is what the CLI calls (see
``/work/notes/issue14_cli.md``): it builds the model and reads the training config, and its
``run(train, eval)`` hands both to ``from_pythae``. Each file that is missing, unreadable or not
pythae's is a ``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from engine.errors import ConfigError
from strategies.pythae.mapping import LAYOUTS
from strategies.pythae.run import PythaeRun, from_pythae
from strategies.pythae.version import import_pythae

MODEL_CONFIG_FILE = "model_config.json"
MODEL_WEIGHTS_FILE = "model.pt"


@attrs.define(eq=False)
class PythaeSetup:
    """A pythae model and its training config (None: the pipeline's default), read from files."""

    model: torch.nn.Module
    training_config: Any = None

    def run(self, train_data: Any, eval_data: Any = None, **options: Any) -> PythaeRun:
        """``from_pythae(self.model, self.training_config, train_data, eval_data, **options)``."""
        return from_pythae(self.model, self.training_config, train_data, eval_data, **options)


def load_from_json(
    model_config_path: str | os.PathLike[str],
    training_config_path: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> PythaeSetup:
    """The model described by ``model_config_path`` and the training config in
    ``training_config_path``.

    ``model_config_path`` is a ``model_config.json`` (a new model with pythae's default
    networks, its weights drawn after ``torch.manual_seed(seed)``; ``seed`` defaults to the
    training config's, so the two files fix the initial weights) or a folder written by
    ``model.save`` / ``export_to_pythae`` (the trained model, loaded by
    ``AutoModel.load_from_folder``). A flow's config gives ``NFModel(standard normal prior,
    flow)``, as pythae's examples train flows.
    """
    import_pythae()
    training_config = (
        None if training_config_path is None else load_training_config(training_config_path)
    )
    path = Path(model_config_path)
    if path.is_dir():
        return PythaeSetup(load_model_folder(path), training_config)
    if seed is None:
        seed = training_config.seed if training_config is not None else _default_seed()
    torch.manual_seed(seed)
    return PythaeSetup(build_model(load_model_config(path)), training_config)


def _default_seed() -> int:
    from pythae.trainers import BaseTrainerConfig

    return int(BaseTrainerConfig.__dataclass_fields__["seed"].default)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"can not read {what} {str(path)!r}: {error}") from None
    if not isinstance(values, dict) or not isinstance(values.get("name"), str):
        raise ConfigError(
            f"{what} {str(path)!r} is not a pythae config: it needs a 'name' naming its class "
            "(pythae's save_json writes it)"
        )
    return values


def load_training_config(path: str | os.PathLike[str]) -> Any:
    """One of pythae's four training configs from its JSON file.

    Read field by field rather than by pythae's ``from_json_file``: under pydantic 2 that
    refuses the ``null`` pythae itself writes for an unset scheduler of the multi-optimiser
    configs (their fields are typed ``str`` with a ``None`` default). A ``null`` whose field
    defaults to ``None`` is therefore left to that default; a key the config does not have is
    refused (pythae would ignore a misspelt field)."""
    from pythae import trainers

    path = Path(path)
    values = _read_json(path, "training config")
    name = values.pop("name")
    if name not in LAYOUTS:
        raise ConfigError(
            f"training config {str(path)!r} names {name!r}; expected one of {list(LAYOUTS)}"
        )
    config_class = getattr(trainers, name)
    fields = {field.name: field for field in dataclasses.fields(config_class) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"training config {str(path)!r} has field(s) {unknown} that {name} does not have"
        )
    given = {
        key: value
        for key, value in values.items()
        if not (value is None and fields[key].default is None)
    }
    try:
        return config_class(**given)
    except (TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"training config {str(path)!r} is not a valid {name}: {error}") from None


def model_classes() -> dict[str, type]:
    """Every model class pythae exports (normalizing flows too), by its config class's name;
    the abstract ``BaseAE`` and ``BaseNF`` (whose forward raises) are left out."""
    from pythae import models
    from pythae.models import normalizing_flows

    exported = {name: getattr(models, name) for name in models.__all__}
    exported.update({name: getattr(normalizing_flows, name) for name in normalizing_flows.__all__})
    abstract = (models.BaseAE, normalizing_flows.BaseNF)
    classes: dict[str, type] = {}
    for name, value in exported.items():
        if not isinstance(value, type) or value in abstract:
            continue
        for config_name in (f"{name}Config", f"{name}_Config"):
            if config_name in exported:
                classes[config_name] = value
    return classes


def load_model_config(path: str | os.PathLike[str]) -> Any:
    """A pythae model config from its JSON file."""
    from pythae.models.auto_model import AutoConfig

    path = Path(path)
    name = _read_json(path, "model config")["name"]
    if name not in model_classes():
        raise ConfigError(
            f"model config {str(path)!r} names {name!r}, which is no pythae model's config; "
            f"known: {sorted(model_classes())}"
        )
    try:
        return AutoConfig.from_json_file(str(path))
    except (TypeError, ValueError, AttributeError, NameError) as error:
        raise ConfigError(f"model config {str(path)!r} is not a valid {name}: {error}") from None


def build_model(model_config: Any) -> torch.nn.Module:
    """A new model for ``model_config`` with pythae's default networks (a flow inside
    ``NFModel``)."""
    name = type(model_config).__name__
    for side in ("encoder", "decoder"):
        if getattr(model_config, f"uses_default_{side}", True) is False:
            raise ConfigError(
                f"model config {name} says its {side} is a custom network, which a JSON config "
                f"can not hold; pass the saved model folder (with {side}.pkl) instead"
            )
    return in_nf_model(model_classes()[name](model_config))


def in_nf_model(model: torch.nn.Module) -> torch.nn.Module:
    """A normalizing flow (other than PixelCNN) inside ``NFModel`` with a standard normal prior
    over its flattened input, as pythae's examples train flows; any other model as it is."""
    from pythae.models.normalizing_flows import BaseNF, NFModel, PixelCNN

    if not isinstance(model, BaseNF) or isinstance(model, PixelCNN):
        return model
    dim = int(np.prod(model.model_config.input_dim))
    prior = torch.distributions.MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    return NFModel(prior, model)  # type: ignore[no-any-return]


def load_model_folder(folder: str | os.PathLike[str]) -> torch.nn.Module:
    """A trained pythae model from the folder ``model.save`` wrote (a flow inside
    ``NFModel``)."""
    from pythae.models import AutoModel

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"pythae model folder {str(folder)!r} does not exist")
    for needed in (MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise ConfigError(
                f"pythae model folder {str(folder)!r} has no {needed} (model.save writes "
                f"{MODEL_CONFIG_FILE} and {MODEL_WEIGHTS_FILE}); it holds "
                f"{sorted(p.name for p in folder.iterdir())}"
            )
    load_model_config(folder / MODEL_CONFIG_FILE)  # a clear error for a foreign config
    return in_nf_model(AutoModel.load_from_folder(str(folder)))

"""Model weights for use outside the engine: a plain ``state_dict`` file and the model's config.

``torch.load("model_final.pt")`` and ``model.load_state_dict(...)`` are all a user needs; the
config JSON (when the model has a ``config`` dict, dataclass, attrs class or ``to_dict()``)
tells them how to build the model first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from engine.checkpoint.format import fsync_dir, save_json_file, save_torch_file


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's ``config`` attribute as a plain dict, or None when it has none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        values = to_dict()
        return dict(values) if isinstance(values, Mapping) else None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if attrs.has(type(config)):
        return attrs.asdict(config)
    return None


def export_weights(
    path: Path,
    state: Mapping[str, torch.Tensor] | None,
    source: Path | None = None,
    durable: bool = True,
) -> Path:
    """Write ``state`` (as CPU tensors) to ``path`` atomically; or, given ``source``, a file that
    already holds exactly that state (a checkpoint's ``model.pt``), hard-link it (copy it where
    links are not supported) instead."""
    if source is not None:
        temporary = path.with_name(f".{path.name}.link-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, path)
        if durable:
            fsync_dir(path.parent)
        return path
    if state is None:
        raise ValueError(f"export_weights({str(path)!r}) needs a state or a source file")
    save_torch_file(path, {key: value.detach().cpu() for key, value in state.items()}, durable)
    return path


def export_config(path: Path, model: torch.nn.Module, durable: bool = True) -> Path | None:
    """Write the model's config as JSON to ``path``; None when the model has no config."""
    config = model_config(model)
    if config is None:
        return None
    save_json_file(path, config, durable)
    return path

"""A trained model back in pythae's format, for pythae's samplers, metrics and pipelines.

``export_to_pythae(model, folder)`` writes what ``pythae.models.AutoModel.load_from_folder``
reads, through the model's own ``save``: ``model_config.json``, ``model.pt`` (``{"model_state_dict":
state_dict}``), ``environment.json``, and the pickled networks pythae keeps for custom
architectures (``encoder.pkl``, ``decoder.pkl``, ``discriminator.pkl``, ``metric.pkl``...).
A flow inside ``NFModel`` is saved as pythae saves it: the flow alone. ``checkpoint=`` first
loads the weights of one of the engine's checkpoints into the model.

The folder is written in a hidden staging folder beside it and renamed into place, so a crash
leaves either the previous export or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from engine.checkpoint.format import load_checkpoint, resolve_resume
from engine.errors import ConfigError
from strategies.pythae.version import import_pythae


def export_to_pythae(
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Save ``model`` (with the weights of ``checkpoint``, an engine checkpoint or run folder,
    when given) as a pythae model folder at ``folder``; returns the folder."""
    import_pythae()
    if not callable(getattr(model, "save", None)) or not hasattr(model, "model_config"):
        raise ConfigError(
            f"model {type(model).__name__} is not a pythae model: it has no save() and "
            "model_config to export"
        )
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"export folder {str(target)!r} exists and is not a folder")
    if checkpoint is not None:
        loaded = load_checkpoint(resolve_resume(checkpoint, None, None))
        model.load_state_dict(loaded.model_state)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save(str(staging))  # type: ignore[operator]
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing a previous export there."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old, target)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)

"""Turning the config's device string into a ``torch.device`` that exists on this machine."""

from __future__ import annotations

import torch

from engine.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (the local rank's GPU), then MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available here")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: index {index} but only {torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for but MPS is not available here")
    return device

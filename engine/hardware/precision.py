"""Mixed precision: the autocast context for a step and the one GradScaler of a run.

bf16 needs no scaler; fp16 gets one ``torch.amp.GradScaler`` shared by every optimiser of the
strategy (``unscale_`` per optimiser before clipping, one ``update()`` per iteration).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    """A zero-argument factory of the context manager to run a forward under."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, none otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)

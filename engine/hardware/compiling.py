"""Compiling the model for a run (``EngineConfig(compile=True)``).

The model is compiled with ``torch.compile`` and the strategies call the compiled module as they
would the original; checkpoints and exports keep the original's parameter names.

A strategy that trains several losses back-propagates through one forward graph more than once
(``retain_graph``, to keep each loss's gradient in its own parameter group). A compiled backward
that donates its saved buffers (an AOT-autograd memory optimisation) refuses a second pass, and
backwards may be compiled late (at the first backward after a recompilation for new shapes). So
for such strategies buffer donation is off for the whole run, through torch's own scoped config
patch; a one-loss strategy keeps it.
"""

from __future__ import annotations

import contextlib

import torch
from torch._functorch import config as functorch_config


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``: compiled at its first call, recompiled when shapes change."""
    return torch.compile(model)  # type: ignore[return-value]


def compiled_backward_settings(
    compiled: bool, backwards_per_graph: int
) -> contextlib.AbstractContextManager[object]:
    """The torch settings a run's compiled graphs need while it trains: buffer donation off
    when one forward graph takes several backward passes (where this torch has donation)."""
    if compiled and backwards_per_graph > 1 and hasattr(functorch_config, "donated_buffer"):
        return functorch_config.patch(donated_buffer=False)  # type: ignore[no-any-return]
    return contextlib.nullcontext()

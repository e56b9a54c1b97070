"""What ``EngineConfig(compile=...)`` compiles for a run: nothing, the model, or the train step.

``compile=True`` or ``"model"``: the model is compiled with ``torch.compile`` and the strategies
call the compiled module as they would the original; checkpoints and exports keep the
original's parameter names. Autograd runs each backward through the compiled backward graph.

``compile="step"``: the strategy's whole ``train_step`` is compiled (``torch.compile`` of the
bound method; dynamo inlines ``ctx.forward``, the model, the loss reads and
``strategies/update.py``'s isolated backwards). With dynamo's ``trace_autograd_ops`` each
``loss.backward(inputs=...)`` is traced as ``autograd.grad`` plus an in-graph gradient
accumulation, so a forward and all of its isolated backwards become one inductor program: no
autograd engine, no saved-tensor bookkeeping, no Python between the kernels. The optimiser
steps (``apply_updates``/``step_update``: gradient averaging, unscale, clipping, the step, the
GradScaler's update, per-step schedulers) run between graphs as torch built them (fused
kernels): a compiled optimiser step guards on the optimiser object, so every fit (each builds
new optimisers) would recompile it, and after 8 fits in one process dynamo's recompile limit
sends it back to eager for good (measured on the 1x4x4 VAE: compiled optimiser 0.64 ms/step,
fused kernel between graphs 0.65 ms/step, after the limit 1.23 ms/step). Shapes are static
(``dynamic=False``): a short last batch compiles once more (one recompile), and both graphs
serve every later epoch. What dynamo cannot trace (``nonfinite="skip"``'s check) ends a graph
there and runs eagerly, correct but slower. A forward that returns ``update_<role>`` flags as
device tensors (VAEGAN's equilibrium rule) has every role's gradient traced into its graph
before the flags are read; the flags then decide, eagerly, which gradients are kept and which
optimisers step (``strategies/joint.py``'s ``train_step_of``). A role that is off costs its
backward's kernels inside the graph; reading the flags first ended the graph there, and dynamo,
resuming after the read, recompiled the rest of the step at every step until its limit
(README "Performance" has what it measures).

On CUDA with ``accumulate_steps == 1`` the compiled step is also captured as CUDA graphs
(``mode="reduce-overhead"``): each step marks a new graph-tree step and its metrics are copied
out of the graphs' memory pool (a replay reuses it) before the loop buffers them. With
accumulation, gradients must outlive a replay, so no graphs are captured.

A strategy that trains several losses back-propagates through one forward graph more than once
(``retain_graph``). A compiled backward that donates its saved buffers (an AOT-autograd memory
optimisation) refuses a second pass, and backwards may be compiled late (at the first backward
after a recompilation for new shapes). So for such strategies buffer donation is off for the
whole run, through torch's own scoped config patch; a one-loss strategy keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch._dynamo import config as dynamo_config
from torch._functorch import config as functorch_config

from engine.context import StepContext

TrainStep = Callable[[torch.nn.Module, Any, StepContext], Mapping[str, torch.Tensor]]

MODES = (False, True, "model", "step")


@attrs.frozen
class RunCompilation:
    """What a run trains with: the model the strategy is called with (compiled or not), the
    train step the loop calls, and the torch settings to hold while it trains."""

    model: torch.nn.Module
    train_step: TrainStep
    settings: Callable[[], contextlib.AbstractContextManager[object]]


def compile_run(
    mode: bool | str,
    model: torch.nn.Module,
    train_step: TrainStep,
    loss_count: int,
    device: torch.device,
    accumulate_steps: int = 1,
) -> RunCompilation:
    """The model and train step of a run under ``EngineConfig.compile == mode``."""
    multi_loss = loss_count > 1
    if mode == "step":
        graphs = cuda_graphs_apply(device, accumulate_steps)
        return RunCompilation(
            model, compile_step(train_step, graphs), lambda: step_settings(multi_loss)
        )
    if mode:
        return RunCompilation(
            compile_model(model), train_step, lambda: compiled_backward_settings(True, loss_count)
        )
    return RunCompilation(model, train_step, contextlib.nullcontext)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``: compiled at its first call, recompiled when shapes change."""
    return torch.compile(model)  # type: ignore[return-value]


def cuda_graphs_apply(device: torch.device, accumulate_steps: int) -> bool:
    """Whether a compiled step is captured as CUDA graphs: on CUDA, without accumulation (an
    accumulated gradient would live in a graph's pool, which the next replay overwrites)."""
    return device.type == "cuda" and accumulate_steps == 1


def compile_step(train_step: TrainStep, cuda_graphs: bool = False) -> TrainStep:
    """``train_step`` compiled whole (see the module's docstring); run it under
    ``step_settings``, which traces backwards into the graph."""
    mode = "reduce-overhead" if cuda_graphs else None
    compiled: TrainStep = torch.compile(train_step, dynamic=None, mode=mode)
    if not cuda_graphs:
        return compiled

    def graphed_step(
        model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        metrics = compiled(model, batch, ctx)
        return {key: value.clone() for key, value in metrics.items()}

    return graphed_step


@contextlib.contextmanager
def step_settings(multi_loss: bool) -> Iterator[None]:
    """While a compiled step trains: dynamo traces ``Tensor.backward``/``autograd.grad`` into
    the graph and resumes after a graph break inside a nested call (the optimiser steps are
    called from inside the strategy's helpers); a frame dynamo itself fails on (a torch bug,
    e.g. a frozen attrs class built inside the step) runs eagerly with a warning instead of
    failing the run; buffer donation is off for several losses (a backward that falls back to
    AOT autograd may run twice through one graph)."""
    patch = dynamo_config.patch(
        trace_autograd_ops=True, nested_graph_breaks=True, suppress_errors=True
    )
    with patch, compiled_backward_settings(True, 2 if multi_loss else 1):
        yield


def compiled_backward_settings(
    compiled: bool, backwards_per_graph: int
) -> contextlib.AbstractContextManager[object]:
    """The torch settings a run's compiled graphs need while it trains: buffer donation off
    when one forward graph takes several backward passes (where this torch has donation)."""
    if compiled and backwards_per_graph > 1 and hasattr(functorch_config, "donated_buffer"):
        return functorch_config.patch(donated_buffer=False)  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def recompile_count() -> int:
    """How many recompilations dynamo recorded in this process since its metrics were last
    cleared (``torch._dynamo.utils.clear_compilation_metrics``): compilations of a frame that
    was compiled before, for a guard that failed (new shapes, new values)."""
    from torch._dynamo.utils import get_compilation_metrics

    return sum(1 for metrics in get_compilation_metrics() if metrics.recompile_reason)

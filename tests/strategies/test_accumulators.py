"""Every step reuses each parameter's gradient accumulator, held by the strategy's updates
(``strategies/update.py``, ``held_accumulators``): the autograd nodes that write ``.grad`` in a
step's graph are the held ones, so no step builds them anew."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine, EngineConfig
from tests.engine.checkpoint_cases import KINDS, data, make_case


def _accumulators_reached(loss: torch.Tensor) -> list[Any]:
    """The ``AccumulateGrad`` nodes of ``loss``'s graph."""
    found, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_a_steps_graph_uses_the_held_accumulators(kind: str) -> None:
    model, strategy = make_case(kind, seed=0)
    config = EngineConfig(epochs=1, batch_size=4, shuffle=False, output_dir=None)
    Engine(strategy, config).fit(model, data(8))
    updates = strategy.updates if kind == "standard" else strategy.joint.updates
    # the node each handle's one edge reaches (kept alive in ``nodes``, so their ids stay theirs)
    nodes = [
        handle.grad_fn.next_functions[0][0] for update in updates for handle in update.accumulators
    ]
    assert all(type(node).__name__ == "AccumulateGrad" for node in nodes)
    held = {id(node) for node in nodes}
    assert len(held) == sum(p.requires_grad for p in model.parameters())
    outputs = (
        model(data(4))
        if kind != "sequential" and kind != "two_phase"
        else model(data(4), phase="generator")
    )
    losses = [value for value in outputs.values() if isinstance(value, torch.Tensor)]
    reached = [
        node for loss in losses if loss.grad_fn is not None for node in _accumulators_reached(loss)
    ]
    assert reached, "the graph reaches no parameter"
    assert all(id(node) in held for node in reached)

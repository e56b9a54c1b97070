"""The suite's floor and the engine do the same arithmetic: from the same initial model, one
timed epoch of each gives bitwise the same parameters on every workload (same seed, same data
order, same fused Adam, same isolated backwards). So "engine minus floor" times the engine's own
work, not a different trajectory (whose values, e.g. denormal floats, change the kernels'
speed)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.grouped import grouped_runners
from benchmarks.loops import standard_runners
from benchmarks.workloads import WORKLOADS

STEPS = 12


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_the_floor_and_the_engine_train_the_same_parameters(name: str) -> None:
    workload = WORKLOADS[name]
    data = workload.data(16 * STEPS)
    device = torch.device("cpu")
    if workload.strategy == "Standard":
        runners = standard_runners(workload.make_model, data, 16, device)
    else:
        runners = grouped_runners(workload.strategy, workload.make_model, data, 16, device)
    floor, engine = runners[0], runners[1]
    assert floor.name.startswith("floor") and engine.name.startswith("engine")
    models = []
    for runner in (floor, engine):
        epoch = runner.prepare()
        assert epoch() == STEPS
        assert epoch() == STEPS  # a second epoch continues from the first, as the suite's rounds
        models.append(_trained_model(epoch))
    floor_params, engine_params = (list(model.parameters()) for model in models)
    assert len(floor_params) == len(engine_params) > 0
    assert all(torch.equal(a, b) for a, b in zip(floor_params, engine_params))
    torch.manual_seed(0)  # the runners' initial model (their template)
    initial = list(workload.make_model().parameters())
    assert all(a.shape == b.shape for a, b in zip(floor_params, initial))
    # and they trained: two untouched copies of the initial model would pass the check above
    assert not all(torch.equal(a, b) for a, b in zip(floor_params, initial))


def _trained_model(epoch: object) -> torch.nn.Module:
    """The model an epoch function trains (the runners close over it)."""
    for cell in getattr(epoch, "__closure__", None) or ():
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    raise AssertionError(f"{epoch!r} closes over no model")

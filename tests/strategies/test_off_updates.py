"""An update that is off (flag false, alternation) changes none of its parameters and does not
advance its optimiser's state (step count, Adam moments)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from tests.strategies.builders import ALL_KINDS, build, role_names
from tests.strategies.toy import CoupledToy, make_ctx


def _state_of(strategy: Any, role: str) -> dict[str, Any]:
    update = next(u for u in strategy.joint.updates if u.role == role)
    return copy.deepcopy(
        {
            "params": [p.detach().clone() for p in update.params],
            "optimizer": update.optimizer.state_dict(),
        }
    )


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for old, new in zip(before["params"], after["params"]):
        assert torch.equal(old, new)
    assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
    for index, old_state in before["optimizer"]["state"].items():
        for key, value in old_state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(after["optimizer"]["state"][index][key])
            )


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(ALL_KINDS),
    schedule=st.lists(
        st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    accumulate=st.integers(1, 2),
    n_critic=st.integers(1, 3),
)
def test_an_update_that_is_off_for_a_whole_window_does_not_move_or_advance(
    kind: str,
    schedule: list[tuple[bool, bool, bool, bool]],
    accumulate: int,
    n_critic: int,
) -> None:
    torch.manual_seed(0)
    model = CoupledToy()
    roles = role_names(kind)
    specs = {role: OptimizerSpec("Adam", lr=0.05) for role in roles}
    options = {"n_critic": n_critic} if kind in ("adversarial", "two_phase", "sequential") else {}
    case = build(kind, model, specs, **options)
    case.strategy.setup(model, make_ctx())
    steps = {role: 0 for role in roles}
    for window, flags in enumerate(schedule):
        on = dict(zip(roles, flags))
        for role in roles:  # Python bools and 0-d bool tensors alike
            model.flags[f"update_{role}"] = on[role] if window % 2 else torch.tensor(on[role])
        if "generator" in on:
            on["generator"] = on["generator"] and window % n_critic == n_critic - 1
        before = {role: _state_of(case.strategy, role) for role in roles}
        for micro in range(accumulate):
            data = {"data": torch.randn(4, 3)}
            case.strategy.train_step(
                model, data, make_ctx(micro_index=micro, micro_count=accumulate)
            )
        for role in roles:
            if on[role]:
                steps[role] += 1
            else:
                _assert_same(before[role], _state_of(case.strategy, role))
    for role in roles:
        update = next(u for u in case.strategy.joint.updates if u.role == role)
        counts = {
            int(update.optimizer.state[p]["step"])
            for p in update.params
            if p in update.optimizer.state
        }
        assert counts == ({steps[role]} if steps[role] else set())

"""The role-keyed records of ``JointUpdates``: a role whose forward did not run has no record
(its flag is neither read nor agreed on), and the schedule is each role's interval."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from strategies import Adversarial
from strategies.joint import flags_from, read_together
from tests.strategies.toy import CoupledToy, make_ctx

SGD = OptimizerSpec("SGD", lr=0.1)


def test_a_role_whose_forward_did_not_run_has_no_record_and_no_flag() -> None:
    model = CoupledToy()
    strategy = Adversarial(generator=SGD, discriminator=SGD, two_phase=True)
    strategy.setup(model, make_ctx())
    ctx = make_ctx()
    critic = model({"data": torch.randn(4, 3)}, phase="discriminator")
    critic["update_generator"] = "not a flag"  # read only for a generator that ran
    steps = strategy.joint.read({"discriminator": critic}, ctx)
    assert list(steps) == ["discriminator"]
    assert steps["discriminator"].flag and steps["discriminator"].active
    assert strategy.joint.read_flags({"discriminator": critic}, ctx) == {"discriminator": True}


@settings(max_examples=20, deadline=None)
@given(n_critic=st.integers(1, 5), windows=st.integers(0, 12))
def test_each_role_is_scheduled_by_its_own_interval(n_critic: int, windows: int) -> None:
    model = CoupledToy()
    strategy = Adversarial(generator=SGD, discriminator=SGD, n_critic=n_critic)
    strategy.setup(model, make_ctx())
    on = []
    for _ in range(windows):
        on.append(strategy.joint.scheduled("generator"))
        assert strategy.joint.scheduled("discriminator")
        strategy.train_step(model, {"data": torch.randn(4, 3)}, make_ctx())
    assert on == [w % n_critic == n_critic - 1 for w in range(windows)]
    assert strategy.state_dict()["windows"] == windows


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=4))
def test_flags_read_together_keep_each_roles_value(kinds: list[tuple[bool, bool]]) -> None:
    """``flags_from`` (on the CPU each tensor read alone) and ``read_together`` (one transfer,
    as on an accelerator) give each role its own value, whichever are Python bools and which
    tensors."""
    roles = [f"role{index}" for index in range(len(kinds))]
    values = {
        role: torch.tensor(value) if as_tensor else value
        for role, (value, as_tensor) in zip(roles, kinds)
    }
    keys = {role: f"update_{role}" for role in roles}
    expected = {role: value for role, (value, _) in zip(roles, kinds)}
    flags = flags_from(values, keys, make_ctx())
    assert flags == expected
    assert all(type(flag) is bool for flag in flags.values())
    # the one-transfer read of an accelerator's flags (here on CPU tensors) keeps them too
    tensors = {role: torch.tensor(value) for role, value in expected.items()}
    together = read_together(tensors)
    assert together == expected
    assert all(type(flag) is bool for flag in together.values())

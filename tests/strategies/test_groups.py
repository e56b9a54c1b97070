"""Parameter groups: defaults by submodule, by attribute names, by function; disjoint and
covering every trainable parameter, or an error naming the parameters at fault."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine.config.specs import OptimizerSpec
from engine.errors import StrategyError
from strategies import Adversarial, Coupled, CoupledAdversarial
from strategies.groups import resolve_groups
from tests.strategies.toy import CoupledToy, make_ctx

SGD = OptimizerSpec("SGD", lr=0.1)


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_default_groups_follow_the_submodules_and_the_generator_is_the_rest() -> None:
    model = CoupledToy()
    model.extra = nn.Linear(2, 2)  # outside every named submodule: belongs to the generator
    groups = resolve_groups(model, ("generator", "discriminator"), None)
    assert _ids(groups["discriminator"]) == _ids(list(model.discriminator.parameters()))
    expected = [*model.encoder.parameters(), *model.decoder.parameters(), *model.extra.parameters()]
    assert _ids(groups["generator"]) == _ids(expected)
    coupled = resolve_groups(CoupledToy(), ("encoder", "decoder", "discriminator"), None)
    assert [len(coupled[role]) for role in ("encoder", "decoder", "discriminator")] == [2, 2, 2]


def test_groups_by_attribute_names_reach_nested_modules_and_single_parameters() -> None:
    model = CoupledToy()
    names = {
        "generator": ("encoder", "decoder", "discriminator.bias"),
        "discriminator": "discriminator.weight",
    }
    groups = resolve_groups(model, ("generator", "discriminator"), names)
    assert _ids(groups["discriminator"]) == {id(model.discriminator.weight)}
    assert id(model.discriminator.bias) in _ids(groups["generator"])


def test_groups_by_function_and_frozen_parameters_are_left_out() -> None:
    model = CoupledToy()
    model.decoder.bias.requires_grad_(False)

    def split(m: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {
            "encoder": list(m.encoder.parameters()),
            "decoder": [*m.decoder.parameters(), *m.discriminator.parameters()],
        }

    strategy = Coupled(encoder=SGD, decoder=SGD, groups=split)
    strategy.setup(model, make_ctx())
    decoder = next(u for u in strategy.joint.updates if u.role == "decoder")
    assert id(model.decoder.bias) not in _ids(decoder.params)
    assert len(decoder.params) == 3


@pytest.mark.parametrize(
    ("build", "fault"),
    [
        (lambda: Coupled(encoder=SGD, decoder=SGD), "discriminator.weight"),  # not covered
        (
            lambda: Adversarial(
                generator=SGD,
                discriminator=SGD,
                groups={
                    "generator": ("encoder", "decoder", "discriminator.bias"),
                    "discriminator": "discriminator",
                },
            ),
            "discriminator.bias (in 'generator' and 'discriminator')",
        ),
        (
            lambda: CoupledAdversarial(
                encoder=SGD,
                decoder=SGD,
                discriminator=SGD,
                groups={"encoder": "encoder", "decoder": "decoder", "critic": "discriminator"},
            ),
            "unknown ['critic']",
        ),
        (
            lambda: Coupled(
                encoder=SGD,
                decoder=SGD,
                groups={"encoder": "encoderr", "decoder": ("decoder", "discriminator")},
            ),
            "no submodule 'encoderr'",
        ),
        (
            lambda: Coupled(encoder=SGD, decoder=SGD, groups=lambda m: list(m.parameters())),
            "must return a mapping",
        ),
        (
            lambda: Coupled(
                encoder=SGD,
                decoder=SGD,
                groups=lambda m: {
                    "encoder": [nn.Parameter(torch.ones(7))],
                    "decoder": list(m.parameters()),
                },
            ),
            "shape (7,) that is not a parameter of the model",
        ),
        (
            lambda: Coupled(
                encoder=SGD,
                decoder=SGD,
                groups={"encoder": (), "decoder": ("encoder", "decoder", "discriminator")},
            ),
            "['encoder'] have no trainable parameters",
        ),
        (lambda: Coupled(encoder=SGD, decoder=SGD, groups=42), "got 42"),
    ],
)
def test_bad_groups_fail_at_setup_naming_the_fault_and_change_nothing(build, fault: str) -> None:  # type: ignore[no-untyped-def]
    model = CoupledToy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StrategyError) as error:
        build().setup(model, make_ctx())
    assert fault in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_the_default_submodule_is_named_with_its_submodules() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(StrategyError, match=r"no submodule 'discriminator'.*\['0'\]"):
        Adversarial(generator=SGD, discriminator=SGD).setup(model, make_ctx())


@settings(max_examples=40, deadline=None)
@given(
    assignment=st.lists(st.sets(st.sampled_from(["encoder", "decoder"])), min_size=6, max_size=6)
)
def test_groups_are_accepted_exactly_when_disjoint_covering_and_non_empty(
    assignment: list[set[str]],
) -> None:
    model = CoupledToy()
    named = list(model.named_parameters())
    groups = {
        role: [p for (_, p), roles in zip(named, assignment) if role in roles]
        for role in ("encoder", "decoder")
    }
    valid = all(len(roles) == 1 for roles in assignment) and all(groups.values())
    if valid:
        resolved = resolve_groups(model, ("encoder", "decoder"), lambda m: groups)
        assert {r: _ids(v) for r, v in resolved.items()} == {r: _ids(v) for r, v in groups.items()}
        return
    with pytest.raises(StrategyError) as error:
        resolve_groups(model, ("encoder", "decoder"), lambda m: groups)
    message = str(error.value)
    overlapping = [name for (name, _), roles in zip(named, assignment) if len(roles) > 1]
    uncovered = [name for (name, _), roles in zip(named, assignment) if not roles]
    if overlapping:
        assert all(name in message for name in overlapping)
    elif not all(groups.values()):
        assert "have no trainable parameters" in message
    else:
        assert all(name in message for name in uncovered)

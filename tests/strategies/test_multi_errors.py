"""Bad configuration and bad model outputs fail with errors naming the value, changing nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.errors import ConfigError, ModelOutputError, StrategyError
from strategies import Adversarial, Coupled, CoupledAdversarial
from tests.strategies.builders import KINDS, build, role_names
from tests.strategies.toy import CoupledToy, make_ctx

SGD = OptimizerSpec("SGD", lr=0.1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Coupled(encoder="Adam", decoder=SGD),
            "encoder must be an OptimizerSpec, got 'Adam'",
        ),
        (
            lambda: CoupledAdversarial(
                encoder=SGD, decoder=SGD, discriminator=SGD, decoder_scheduler="StepLR"
            ),
            "decoder_scheduler must be a SchedulerSpec or None, got 'StepLR'",
        ),
        (
            lambda: Adversarial(generator=SGD, discriminator=SGD, n_critic=0),
            "n_critic must be a positive integer, got 0",
        ),
        (lambda: Adversarial(generator=SGD, discriminator=SGD, n_critic=True), "got True"),
        (lambda: Adversarial(generator=SGD, discriminator=SGD, n_critic=2.0), "got 2.0"),
        (
            lambda: Adversarial(generator=SGD, discriminator=SGD, two_phase="yes"),
            "two_phase must be true or false, got 'yes'",
        ),
        (
            lambda: Coupled(encoder=SGD, decoder=SGD, grad_clip_norm={"encodr": 1.0}),
            "unknown role(s) ['encodr']; the roles are ['encoder', 'decoder']",
        ),
        (
            lambda: Coupled(encoder=SGD, decoder=SGD, grad_clip_norm=-1.0),
            "grad_clip_norm for encoder must be a positive number, got -1.0",
        ),
        (
            lambda: Coupled(encoder=SGD, decoder=SGD, decoder_loss_key=""),
            "decoder_loss_key must be a non-empty string",
        ),
        (
            lambda: Coupled(encoder=SGD, decoder=SGD, metrics="recon_loss"),
            "metrics must be a tuple of output names, got 'recon_loss'",
        ),
    ],
)
def test_bad_configuration_fails_at_construction_naming_the_value(make: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert message in str(error.value)


def _case(kind: str) -> Any:
    torch.manual_seed(0)
    case = build(kind, CoupledToy(), {role: SGD for role in role_names(kind)})
    case.strategy.setup(case.model, make_ctx())
    return case


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (1, "must be a bool or a one-element bool tensor, got 1"),
        (torch.tensor(1.0), "got tensor of dtype torch.float32 and shape ()"),
        (torch.tensor([True, False]), "shape (2,)"),
    ],
)
def test_a_bad_flag_is_named_and_nothing_moves(kind: str, flag: Any, message: str) -> None:
    case = _case(kind)
    role = role_names(kind)[-1]
    case.model.flags[f"update_{role}"] = flag
    before = _params(case.model)
    with pytest.raises(ModelOutputError) as error:
        case.strategy.train_step(case.model, {"data": torch.randn(4, 3)}, make_ctx())
    assert f"'update_{role}'" in str(error.value) and message in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(case.model)))
    assert all(p.grad is None for p in case.model.parameters())


def test_a_missing_loss_names_the_key_and_the_keys_present() -> None:
    case = _case("coupled")
    strategy = Coupled(encoder=SGD, decoder=SGD, decoder_loss_key="dec_loss")
    strategy.setup(case.model, make_ctx())
    before = _params(case.model)
    with pytest.raises(ModelOutputError, match=r"no loss 'dec_loss' at step 0; keys present: \["):
        strategy.train_step(case.model, {"data": torch.randn(4, 3)}, make_ctx())
    assert all(torch.equal(a, b) for a, b in zip(before, _params(case.model)))


def test_a_loss_without_a_gradient_path_is_named_before_any_backward() -> None:
    case = _case("coupled_adversarial")
    case.model.flags["discriminator_loss"] = torch.tensor(0.5)  # a constant overrides the loss
    before = _params(case.model)
    with pytest.raises(
        ModelOutputError,
        match="loss 'discriminator_loss' of the discriminator update does not depend",
    ):
        case.strategy.train_step(case.model, {"data": torch.randn(4, 3)}, make_ctx())
    assert all(torch.equal(a, b) for a, b in zip(before, _params(case.model)))
    assert all(p.grad is None for p in case.model.parameters())


def test_loading_a_state_without_a_role_fails_and_keeps_the_optimisers() -> None:
    case = _case("coupled_adversarial")
    case.strategy.train_step(case.model, {"data": torch.randn(4, 3)}, make_ctx())
    saved = case.strategy.state_dict()
    partial = {"updates": {k: v for k, v in saved["updates"].items() if k != "decoder"}}
    with pytest.raises(StrategyError, match=r"no update for role\(s\) \['decoder'\]"):
        case.strategy.load_state_dict(partial)
    assert str(case.strategy.state_dict()) == str(saved)


def test_a_strategy_that_is_not_set_up_says_so() -> None:
    with pytest.raises(StrategyError, match="not set up"):
        Coupled(encoder=SGD, decoder=SGD).learning_rates()


def test_a_plateau_scheduler_needs_its_monitor() -> None:
    with pytest.raises(ConfigError, match="monitor"):
        Coupled(encoder=SGD, decoder=SGD, encoder_scheduler=SchedulerSpec("ReduceLROnPlateau"))

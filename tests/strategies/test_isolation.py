"""Gradient isolation: one SGD step moves each group by exactly -lr times the gradient of its
own loss with respect to its own parameters, and an update that is off moves nothing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from strategies import Coupled
from tests.strategies.builders import KINDS, build, role_names
from tests.strategies.toy import CoupledToy, make_ctx, own_gradients, params_of

FLAG_VALUES = (None, True, False, torch.tensor(True), torch.tensor(False))


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    features=st.integers(1, 5),
    latent=st.integers(1, 4),
    batch=st.integers(1, 6),
    lrs=st.lists(st.floats(1e-3, 0.5), min_size=3, max_size=3),
    flags=st.lists(st.sampled_from(range(len(FLAG_VALUES))), min_size=3, max_size=3),
    n_critic=st.integers(1, 3),
    same_loss=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_group_moves_by_minus_lr_times_its_own_gradient(
    kind: str,
    features: int,
    latent: int,
    batch: int,
    lrs: list[float],
    flags: list[int],
    n_critic: int,
    same_loss: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    model = CoupledToy(features, latent, same_coupled_loss=same_loss).double()
    data = {"data": torch.randn(batch, features, dtype=torch.float64)}
    roles = role_names(kind)
    specs = {role: OptimizerSpec("SGD", lr=lr) for role, lr in zip(roles, lrs)}
    options = {"n_critic": n_critic} if kind in ("adversarial", "two_phase", "sequential") else {}
    case = build(kind, model, specs, **options)
    for role, index in zip(roles, flags):
        if FLAG_VALUES[index] is not None:
            model.flags[f"update_{role}"] = FLAG_VALUES[index]
    ctx = make_ctx()
    case.strategy.setup(model, ctx)

    expected = {}
    for role, (loss_key, modules, phase) in case.roles.items():
        flag = model.flags.get(f"update_{role}", True)
        on = bool(flag) and not (role == "generator" and n_critic > 1)
        before = [p for m in modules for p in params_of(m)]
        if on:
            grads = own_gradients(model, data, loss_key, modules, phase)
            lr = specs[role].params["lr"]
            before = [p - lr * g for p, g in zip(before, grads)]
        expected[role] = before

    case.strategy.train_step(model, data, ctx)

    for role, (_, modules, _) in case.roles.items():
        after = [p.detach() for m in modules for p in m.parameters()]
        for got, want in zip(after, expected[role]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _pythae_order_gradients(model: CoupledToy, data: dict[str, torch.Tensor]) -> None:
    """pythae's CoupledOptimizerTrainer: every backward on the shared graph, steps after."""
    outputs = model(data)
    model.zero_grad()
    outputs["encoder_loss"].backward(retain_graph=True)
    outputs["decoder_loss"].backward()


def test_the_naive_pythae_order_would_leak_so_the_isolation_test_can_fail() -> None:
    torch.manual_seed(0)
    data = {"data": torch.randn(5, 3, dtype=torch.float64)}
    rae_like = CoupledToy(same_coupled_loss=True).double()
    own = own_gradients(rae_like, data, "encoder_loss", rae_like.encoder)
    _pythae_order_gradients(rae_like, data)
    leaked = [p.grad for p in rae_like.encoder.parameters()]
    for got, want in zip(leaked, own):
        torch.testing.assert_close(got, 2 * want)  # RAE_L2's encoder: exactly twice its own

    vaegan_like = CoupledToy().double()
    own = own_gradients(vaegan_like, data, "encoder_loss", vaegan_like.encoder)
    _pythae_order_gradients(vaegan_like, data)
    leaked = torch.cat([p.grad.flatten() for p in vaegan_like.encoder.parameters()])
    assert not torch.allclose(leaked, torch.cat([g.flatten() for g in own]))


@pytest.mark.parametrize(("same_loss", "passes"), [(True, 1), (False, 2)])
def test_a_loss_shared_by_several_groups_is_back_propagated_once(
    same_loss: bool, passes: int
) -> None:
    model = CoupledToy(same_coupled_loss=same_loss)
    model.discriminator.requires_grad_(False)
    through_decoder_output: list[int] = []

    def count_passes(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda grad: through_decoder_output.append(1))

    model.decoder.register_forward_hook(count_passes)
    sgd = OptimizerSpec("SGD", lr=0.1)
    strategy = Coupled(encoder=sgd, decoder=sgd)
    strategy.setup(model, make_ctx())
    strategy.train_step(model, {"data": torch.randn(4, 3)}, make_ctx())
    # both losses pass through the reconstruction: one backward pass when they are one tensor
    assert len(through_decoder_output) == passes

"""Accumulation, clipping and the GradScaler behave per group as in the Standard strategy."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from tests.strategies.builders import ALL_KINDS, KINDS, build, role_names
from tests.strategies.toy import CoupledToy, make_ctx, own_gradients, params_of


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(ALL_KINDS),
    k=st.integers(1, 4),
    micro=st.integers(1, 4),
    optimizer=st.sampled_from(["SGD", "Adam"]),
    seed=st.integers(0, 2**16),
)
def test_k_micro_batches_equal_one_batch_k_times_larger_per_group(
    kind: str, k: int, micro: int, optimizer: str, seed: int
) -> None:
    torch.manual_seed(seed)
    small = CoupledToy().double()
    large = copy.deepcopy(small)
    data = torch.randn(k * micro, 3, dtype=torch.float64)
    specs = {role: OptimizerSpec(optimizer, lr=0.05) for role in role_names(kind)}
    accumulated = build(kind, small, specs)
    whole = build(kind, large, specs)
    accumulated.strategy.setup(small, make_ctx())
    whole.strategy.setup(large, make_ctx())
    for index, chunk in enumerate(data.split(micro)):
        ctx = make_ctx(micro_index=index, micro_count=k)
        accumulated.strategy.train_step(small, {"data": chunk}, ctx)
    whole.strategy.train_step(large, {"data": data}, make_ctx())
    for got, want in zip(small.parameters(), large.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


class CountingScaler:
    """A real GradScaler that records the order of the calls a step makes on it."""

    def __init__(self, calls: list[str]) -> None:
        self._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.calls = calls

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls.append("scale")
        return self._scaler.scale(loss)

    def unscale_(self, optimizer: Any) -> None:
        self.calls.append("unscale_")
        self._scaler.unscale_(optimizer)

    def step(self, optimizer: Any) -> None:
        self.calls.append("step")
        self._scaler.step(optimizer)

    def update(self) -> None:
        self.calls.append("update")
        self._scaler.update()


def _clipped(grads: list[torch.Tensor], norm: float | None) -> list[torch.Tensor]:
    if norm is None:
        return grads
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coefficient = torch.clamp(norm / (total + 1e-6), max=1.0)
    return [g * coefficient for g in grads]


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    engine_clip=st.one_of(st.none(), st.floats(1e-3, 2.0)),
    per_role=st.dictionaries(
        st.sampled_from(["encoder", "decoder", "discriminator", "generator"]), st.floats(1e-3, 2.0)
    ),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_group_is_unscaled_then_clipped_by_its_own_norm(
    kind: str, engine_clip: float | None, per_role: dict[str, float], scaled: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = CoupledToy().double()
    data = {"data": torch.randn(5, 3, dtype=torch.float64)}
    roles = role_names(kind)
    per_role = {role: norm for role, norm in per_role.items() if role in roles}
    specs = {role: OptimizerSpec("SGD", lr=0.1) for role in roles}
    case = build(kind, model, specs, grad_clip_norm=per_role or None)
    ctx = make_ctx(grad_clip_norm=engine_clip)
    calls: list[str] = []
    if scaled:
        ctx.scaler = CountingScaler(calls)  # type: ignore[assignment]
    case.strategy.setup(model, ctx)
    expected = {}
    for role, (loss_key, modules, phase) in case.roles.items():  # n_critic=1: all on
        grads = own_gradients(model, data, loss_key, modules, phase)
        norm = per_role.get(role, engine_clip)
        before = [p for m in modules for p in params_of(m)]
        expected[role] = [p - 0.1 * g for p, g in zip(before, _clipped(grads, norm))]

    case.strategy.train_step(model, data, ctx)

    for role, (_, modules, _) in case.roles.items():
        after = [p.detach() for m in modules for p in m.parameters()]
        for got, want in zip(after, expected[role]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if scaled:
        groups = len(roles)
        assert calls.count("update") == 1 and calls[-1] == "update"
        assert calls.count("unscale_") == groups == calls.count("step")
        steps = [i for i, c in enumerate(calls) if c == "step"]
        unscales = [i for i, c in enumerate(calls) if c == "unscale_"]
        assert all(u < s for u, s in zip(unscales, steps))


class DecoderUnreached(torch.nn.Module):
    """``decoder_loss`` depends on the encoder only: the decoder group gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(2, 2)
        self.decoder = torch.nn.Linear(2, 2)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = self.encoder(batch).pow(2).mean()
        return {"encoder_loss": loss, "decoder_loss": 2 * loss}


def test_a_group_its_loss_does_not_reach_is_left_alone_under_the_scaler() -> None:
    from strategies import Coupled

    model = DecoderUnreached()
    strategy = Coupled(encoder=OptimizerSpec("Adam", lr=0.1), decoder=OptimizerSpec("Adam", lr=0.1))
    calls: list[str] = []
    ctx = make_ctx()
    ctx.scaler = CountingScaler(calls)  # type: ignore[assignment]
    strategy.setup(model, ctx)
    decoder = [p.detach().clone() for p in model.decoder.parameters()]
    strategy.train_step(model, torch.randn(3, 2), ctx)
    assert all(torch.equal(a, b) for a, b in zip(decoder, model.decoder.parameters()))
    assert calls.count("unscale_") == 1 and calls.count("update") == 1
    assert not strategy.joint.updates[1].optimizer.state

"""``EngineConfig(compile="step")``: every strategy's whole train step compiled trains the model
as eager does; the forward and its isolated backwards are one graph (the only graph breaks are
the optimiser steps, which run eagerly between graphs, and what a strategy must read on the
host); a short last batch costs at most one recompilation.

Equality is to 1e-4 with inductor's random numbers drawn as eager draws them
(``fallback_random``: the standard case trains behind dropout). Counts, never times.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import clear_compilation_metrics, counters

from engine import Engine, EngineConfig
from engine.hardware.compiling import recompile_count
from tests.engine.checkpoint_cases import FEATURES, KINDS, data, make_case

# Strategies whose step reads nothing on the host between the forward and the backwards.
ONE_GRAPH = ("standard", "coupled", "adversarial", "sequential")
# Alternating schedules (n_critic=2): the window's place in the schedule decides which roles
# run, so each place is a program of its own, for each batch shape: 2 places x 2 shapes.
ALTERNATING = ("adversarial", "two_phase", "sequential")
# Recompilations allowed in a fit whose last batch is short. Sequential phases
# (strategies/phase_runner.py): each phase's forward and backward are traced between the
# compiler-disabled optimiser steps, one program per phase, window place and batch shape (7 in
# this fit); below dynamo's limit of 8, so it stays compiled.
ALLOWED = {"sequential": 7, **{kind: 4 for kind in ALTERNATING if kind != "sequential"}}


class StepToy(nn.Module):
    """``tests/strategies/toy.py``'s ``CoupledToy`` losses (each reaches every group), with no
    Python state that changes per call (a list the forward appends to would make every step a
    new program for the compiler: that is the model's cost, not the engine's).

    ``device_flags``: the single forward also returns ``update_decoder`` and
    ``update_discriminator`` as bool tensors that depend on the batch (as VAEGAN's
    equilibrium rule returns them), so some steps switch an update off."""

    def __init__(self, device_flags: bool = False) -> None:
        super().__init__()
        self.device_flags = device_flags
        self.encoder = nn.Linear(FEATURES, 2)
        self.decoder = nn.Linear(2, FEATURES)
        self.discriminator = nn.Linear(FEATURES, 1)

    def forward(self, batch: Any, phase: str | None = None, **_: Any) -> dict[str, Any]:
        x = batch["data"]
        z = torch.tanh(self.encoder(x))
        recon = self.decoder(z)
        score_real = self.discriminator(x).mean()
        score_fake = self.discriminator(recon).pow(2).mean()
        recon_loss = (recon - x).pow(2).mean()
        discriminator_loss = score_fake - 0.5 * score_real + 0.1 * z.pow(2).mean()
        if phase == "discriminator":
            return {"discriminator_loss": discriminator_loss}
        generator_loss = recon_loss - 0.3 * score_fake
        if phase == "generator":
            return {"autoencoder_loss": generator_loss}
        encoder_loss = recon_loss + 0.2 * z.pow(2).mean() + 0.1 * score_fake
        outputs = {
            "encoder_loss": encoder_loss,
            "decoder_loss": recon_loss - 0.4 * score_fake,
            "discriminator_loss": discriminator_loss,
            "autoencoder_loss": generator_loss,
            "recon_loss": recon_loss,
        }
        if self.device_flags:  # from the data alone: the same in eager and compiled steps
            outputs["update_decoder"] = x[:, 0].mean() > 0
            outputs["update_discriminator"] = x[:, 1].mean() < 0.3
        return outputs


def step_case(kind: str) -> tuple[nn.Module, Any]:
    """A ``StepToy`` (or the dropout regressor) and a strategy of ``kind``, with
    ``tests/engine/checkpoint_cases.py``'s optimisers and n_critic 2 where it applies."""
    return make_case(kind, seed=0, n_critic=2, toy=StepToy)


def _train(
    kind: str, compile: Any, samples: int = 37, device_flags: bool = False
) -> dict[str, torch.Tensor]:
    if device_flags:
        model, strategy = make_case(kind, seed=0, toy=lambda: StepToy(device_flags=True))
    else:
        model, strategy = step_case(kind)
    config = EngineConfig(
        epochs=2, batch_size=8, shuffle=False, device="cpu", output_dir=None, compile=compile
    )
    Engine(strategy, config).fit(model, data(samples))  # 37: 4 batches of 8, then one of 5
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_compiled_step_trains_like_eager(kind: str, inductor: None, fresh_dynamo: None) -> None:
    compiled = _train(kind, "step")
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    eager = _train(kind, False)
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_short_last_batch_recompiles_at_most_once(
    kind: str, inductor: None, fresh_dynamo: None
) -> None:
    _train(kind, "step")
    assert recompile_count() <= ALLOWED.get(kind, 1), _reasons()
    clear_compilation_metrics()
    _train(kind, "step", samples=40)  # every batch full: the graphs compiled above serve
    assert recompile_count() == 0, _reasons()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ONE_GRAPH)
def test_forward_and_backwards_are_one_graph(kind: str, inductor: None, fresh_dynamo: None) -> None:
    """The step's only graph breaks are the optimiser steps left to eager (compiler-disabled):
    a break between forward and backward would leave the backward to the autograd engine."""
    _train(kind, "step")
    reasons = list(counters["graph_break"])
    assert reasons, "the optimiser steps should run between graphs"
    assert all("torch.compiler.disable" in reason for reason in reasons), reasons


@pytest.mark.slow
def test_flags_returned_as_device_tensors_train_like_eager_without_recompiling(
    inductor: None, fresh_dynamo: None
) -> None:
    """A forward returning its update flags as device tensors (VAEGAN's equilibrium rule): the
    forward is compiled, the flags are read on the host and the step trains eagerly
    (``strategies/joint.py``'s ``train_step_of``). Before that, dynamo resumed after the read
    and recompiled the rest of the step at every step until its limit."""
    switched = {
        (bool(batch[:, 0].mean() > 0), bool(batch[:, 1].mean() < 0.3))
        for batch in data(37)["data"].split(8)
    }
    assert len(switched) > 1, f"some update must be switched off in some step: {switched}"
    compiled = _train("coupled_adversarial", "step", device_flags=True)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert recompile_count() <= 1, _reasons()
    clear_compilation_metrics()
    _train("coupled_adversarial", "step", samples=40, device_flags=True)
    assert recompile_count() == 0, _reasons()
    eager = _train("coupled_adversarial", False, device_flags=True)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_flags_returned_as_device_tensors_leave_the_backwards_in_the_graph(
    inductor: None, fresh_dynamo: None
) -> None:
    """With flags as device tensors the backwards are still traced into the forward's graph
    (``strategies/joint.py``'s ``_train_on_traced_gradients``), not run by autograd's engine
    after the flags are read: no gradient reaches a parameter through autograd's accumulation
    (whose hook a backward would call), yet the parameters train."""
    model, strategy = make_case("coupled_adversarial", seed=0, toy=lambda: StepToy(True))
    accumulated: list[str] = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda _, name=name: accumulated.append(name))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    config = EngineConfig(epochs=1, batch_size=8, device="cpu", output_dir=None, compile="step")
    Engine(strategy, config).fit(model, data(32))
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert accumulated == [], f"autograd's engine ran backwards into {sorted(set(accumulated))}"
    moved = [name for name, param in model.named_parameters() if not param.equal(before[name])]
    assert sorted(moved) == sorted(before), f"only {moved} trained"


@pytest.mark.slow
def test_the_last_batch_recompile_is_counted(inductor: None, fresh_dynamo: None) -> None:
    """The count the tests above rely on sees a recompilation: 37 samples give a batch of 5
    after batches of 8, which the graph compiled for 8 does not serve."""
    _train("standard", "step")
    assert recompile_count() == 1, _reasons()


def _reasons() -> list[str]:
    from torch._dynamo.utils import get_compilation_metrics

    return [str(m.recompile_reason) for m in get_compilation_metrics() if m.recompile_reason]


def test_compile_accepts_model_and_step_and_refuses_other_values() -> None:
    for value in (False, True, "model", "step"):
        assert EngineConfig(compile=value).compile == value
    with pytest.raises(Exception, match="compile"):
        EngineConfig(compile="graphs")

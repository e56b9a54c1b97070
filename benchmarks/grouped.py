"""Hand-written loops for models with one loss per parameter group, and the engine's runs.

``isolated``: each loss is back-propagated into its own group only (``backward(inputs=...)``;
one backward when every group's loss is the same tensor), the correct update that our
strategies make. ``pythae-style``: every loss back-propagated into every parameter before the
optimisers step, as pythae's multi-optimiser trainers do (cheaper where graphs overlap, but the
gradients leak between groups). ``update_<role>`` flags a model returns switch a group off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.harness import EpochFn, Runner
from benchmarks.loops import LR, ModelFactory, engine_epoch, fresh
from engine import OptimizerSpec
from strategies import Adversarial, Coupled, CoupledAdversarial

Groups = Callable[[torch.nn.Module], list[list[torch.nn.Parameter]]]


def submodule_groups(*names: str) -> Groups:
    """The parameters of ``model.<name>`` per name; ``"rest"`` is every other parameter."""

    def groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
        named = {name: list(getattr(model, name).parameters()) for name in names if name != "rest"}
        taken = {id(p) for params in named.values() for p in params}
        rest = [p for p in model.parameters() if id(p) not in taken]
        return [rest if name == "rest" else named[name] for name in names]

    return groups


def grouped_sliced_epoch(
    model: torch.nn.Module,
    roles: Sequence[tuple[str, str]],
    groups: Groups,
    data: torch.Tensor,
    batch_size: int,
    isolate: bool,
) -> EpochFn:
    """One epoch over slices of a shuffled copy of ``data`` with one fused Adam per group;
    ``roles`` lists ``(role, loss key)`` in the order the losses are back-propagated."""

    def epoch() -> int:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        params = groups(model)
        optimizers = [torch.optim.Adam(group, lr=LR, fused=True) for group in params]
        order = torch.randperm(len(data), generator=generator).to(data.device)
        shuffled = data.index_select(0, order)
        losses: list[torch.Tensor] = []
        model.train()
        for lo in range(0, len(data), batch_size):
            out = model({"data": shuffled[lo : lo + batch_size]})
            active = [bool(out.get(f"update_{role}", True)) for role, _ in roles]
            pairs = [(out[key], group) for (_, key), group, on in zip(roles, params, active) if on]
            _backward(pairs, isolate)
            for optimizer, on in zip(optimizers, active):
                if on:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            losses.append(out[roles[0][1]].detach())
        torch.stack(losses).mean().item()
        return len(losses)

    return epoch


def _backward(pairs: list[tuple[torch.Tensor, list[torch.nn.Parameter]]], isolate: bool) -> None:
    if not pairs:
        return
    if isolate and all(loss is pairs[0][0] for loss, _ in pairs):
        pairs[0][0].backward()
        return
    last = len(pairs) - 1
    for index, (loss, group) in enumerate(pairs):
        loss.backward(inputs=group if isolate else None, retain_graph=index < last)


def _adam() -> OptimizerSpec:
    return OptimizerSpec("Adam", lr=LR)


STRATEGIES: dict[str, tuple[Callable[[], Any], tuple[tuple[str, str], ...], Groups]] = {
    "Adversarial": (
        lambda: Adversarial(generator=_adam(), discriminator=_adam()),
        (("generator", "autoencoder_loss"), ("discriminator", "discriminator_loss")),
        submodule_groups("rest", "discriminator"),
    ),
    "Coupled": (
        lambda: Coupled(encoder=_adam(), decoder=_adam()),
        (("encoder", "encoder_loss"), ("decoder", "decoder_loss")),
        submodule_groups("encoder", "decoder"),
    ),
    "CoupledAdversarial": (
        lambda: CoupledAdversarial(encoder=_adam(), decoder=_adam(), discriminator=_adam()),
        (
            ("encoder", "encoder_loss"),
            ("decoder", "decoder_loss"),
            ("discriminator", "discriminator_loss"),
        ),
        submodule_groups("encoder", "decoder", "discriminator"),
    ),
}


def grouped_runners(
    strategy: str,
    make_model: ModelFactory,
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> list[Runner]:
    """The engine with ``strategy`` against the isolated floor and the pythae-style loop."""
    make_strategy, roles, groups = STRATEGIES[strategy]
    torch.manual_seed(0)
    template = make_model()
    on_device = data.to(device)

    def loop(isolate: bool) -> Callable[[], EpochFn]:
        def prepare() -> EpochFn:
            model = fresh(template, device)
            return grouped_sliced_epoch(model, roles, groups, on_device, batch_size, isolate)

        return prepare

    def engine() -> EpochFn:
        model = fresh(template, device)
        return engine_epoch(model, make_strategy(), {"data": on_device}, batch_size, device)

    return [
        Runner("floor: sliced loop, isolated grads", loop(True)),
        Runner(f"engine + {strategy}", engine),
        Runner("pythae-style loop (grads leak)", loop(False)),
    ]

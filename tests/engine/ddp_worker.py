"""What every rank of a 2-process gloo world runs for ``tests/engine/test_ddp_per_role.py``.

Each scenario drives one strategy by hand (``setup``, then ``train_step`` once per
micro-batch, as the engine does) on a small GAN-shaped model whose every loss reaches every
role, so a gradient that leaked or was not averaged shows. Each rank trains on its own half of
each global batch. Before every optimiser step of every role (an optimiser step pre-hook), the
rank computes the role's *isolated local gradient* itself (``torch.autograd.grad`` of the role's
own loss on a copy of the model, summed over the window's micro-batches), averages it over the
ranks explicitly (``all_reduce``) and records how far the gradient the strategy is about to step
on is from it. After every window it records a digest of every parameter's bytes.

Where the reference gradient is taken: a strategy with one forward for all roles takes every
gradient at the window's starting parameters (the hook uses a copy made then); a sequential
two-phase strategy takes each phase's gradient at the parameters of its own step, after the
earlier phases stepped (the hook copies the model as it is).

``run_scenario`` also runs in one process (the test process) on the whole global batches, for
the "N ranks equal one process with N times the batch" comparison.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from engine.config.specs import OptimizerSpec
from engine.distributed.collectives import World, broadcast_module
from engine.distributed.replication import RoleReplica
from engine.distributed.session import leave_process_group
from strategies import Adversarial, Coupled, CoupledAdversarial, Standard
from tests.strategies.toy import make_ctx

FEATURES = 5
LATENT = 2
HALF = 3  # each rank's share of a global batch
WINDOWS = 4


class Gan(nn.Module):
    """An autoencoder and (optionally) a discriminator that runs twice per forward (real and
    reconstructed), optionally with BatchNorm. Every loss reaches every module. ``spare`` is a
    generator parameter used only where ``use_spare`` is set; ``never`` is never used."""

    def __init__(
        self, discriminator: bool = True, batchnorm: bool = False, spare: bool = False
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 6), nn.Tanh(), nn.Linear(6, FEATURES))
        layers: list[nn.Module] = [nn.Linear(FEATURES, 6)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(6))
        layers += [nn.Tanh(), nn.Linear(6, 1)]
        self.discriminator = nn.Sequential(*layers) if discriminator else None
        self.spare = nn.Parameter(torch.ones(FEATURES)) if spare else None
        self.never = nn.Parameter(torch.ones(FEATURES)) if spare else None
        self.use_spare = False
        self.poison = False  # every loss NaN
        self.flags: dict[str, Any] = {}

    def forward(self, batch: torch.Tensor, phase: str | None = None, **_: Any) -> dict[str, Any]:
        x = batch
        z = torch.tanh(self.encoder(x))
        recon = self.decoder(z)
        if self.spare is not None and self.use_spare:
            recon = recon * self.spare
        recon_loss = (recon - x).pow(2).mean()
        code = 0.2 * z.pow(2).mean()
        out: dict[str, Any] = {"loss": recon_loss + code, "recon_loss": recon_loss}
        out["encoder_loss"] = recon_loss + code
        out["decoder_loss"] = recon_loss
        if self.discriminator is not None:
            real, fake = self.discriminator(x), self.discriminator(recon)
            fooled = F.softplus(-fake).mean()
            critic = F.softplus(-real).mean() + F.softplus(fake).mean() + 0.1 * z.pow(2).mean()
            out["loss"] = recon_loss + code + 0.3 * fooled + 0.5 * critic
            out["autoencoder_loss"] = recon_loss + 0.3 * fooled
            out["encoder_loss"] = recon_loss + code + 0.1 * fooled
            out["decoder_loss"] = recon_loss + 0.4 * fooled
            out["discriminator_loss"] = critic
        if phase == "discriminator":
            out = {"discriminator_loss": out["discriminator_loss"]}
        elif phase == "generator":
            out = {"autoencoder_loss": out["autoencoder_loss"]}
        if self.poison:
            out = {key: value * float("nan") for key, value in out.items()}
        out.update(self.flags)
        return out


def _adam() -> OptimizerSpec:
    return OptimizerSpec("Adam", lr=0.02)


@attrs.frozen
class Scenario:
    """One strategy on one model: what each role's loss is, which forward serves it, and how
    the run is shaped (accumulation, flags switched off on rank 1, unused parameters)."""

    strategy: Callable[[], Any]
    losses: Mapping[str, str]  # role -> loss key
    model: Callable[[], Gan] = Gan
    sequential: bool = False
    micro_count: int = 1
    off_on_rank_one: Mapping[int, str] = attrs.field(factory=dict)  # window -> flag key
    # (window, micro-batch) -> flag key, or "nan" for non-finite losses (nonfinite="skip")
    micro_off_on_rank_one: Mapping[tuple[int, int], str] = attrs.field(factory=dict)
    spare_on_rank_one: bool = False
    comparable: bool = True  # the 1-process run on global batches must match

    def forward_kwargs(self, role: str) -> dict[str, Any]:
        if not self.sequential:
            return {}
        return {"phase": "discriminator" if role == "discriminator" else "generator"}


GAN_ROLES = {"generator": "autoencoder_loss", "discriminator": "discriminator_loss"}
COUPLED_ROLES = {"encoder": "encoder_loss", "decoder": "decoder_loss"}
SCENARIOS: dict[str, Scenario] = {
    "Standard": Scenario(lambda: Standard(_adam()), {"model": "loss"}),
    "Adversarial": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam()), GAN_ROLES
    ),
    "Adversarial two-phase n_critic 2": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam(), two_phase=True, n_critic=2),
        GAN_ROLES,
        sequential=True,
    ),
    "Coupled": Scenario(
        lambda: Coupled(encoder=_adam(), decoder=_adam()),
        COUPLED_ROLES,
        model=lambda: Gan(discriminator=False),
    ),
    "CoupledAdversarial": Scenario(
        lambda: CoupledAdversarial(encoder=_adam(), decoder=_adam(), discriminator=_adam()),
        {**COUPLED_ROLES, "discriminator": "discriminator_loss"},
    ),
    "flag off on one rank": Scenario(
        lambda: CoupledAdversarial(encoder=_adam(), decoder=_adam(), discriminator=_adam()),
        {**COUPLED_ROLES, "discriminator": "discriminator_loss"},
        off_on_rank_one={1: "update_discriminator", 2: "update_decoder"},
        comparable=False,
    ),
    "flag off two-phase": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam(), two_phase=True),
        GAN_ROLES,
        sequential=True,
        off_on_rank_one={1: "update_discriminator", 2: "update_generator"},
        comparable=False,
    ),
    "accumulation": Scenario(
        lambda: CoupledAdversarial(encoder=_adam(), decoder=_adam(), discriminator=_adam()),
        {**COUPLED_ROLES, "discriminator": "discriminator_loss"},
        micro_count=3,
    ),
    "accumulation two-phase n_critic 2": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam(), two_phase=True, n_critic=2),
        GAN_ROLES,
        sequential=True,
        micro_count=2,
    ),
    "flag off on the last micro-batch": Scenario(
        lambda: CoupledAdversarial(encoder=_adam(), decoder=_adam(), discriminator=_adam()),
        {**COUPLED_ROLES, "discriminator": "discriminator_loss"},
        micro_count=2,
        micro_off_on_rank_one={(1, 1): "update_decoder", (2, 0): "update_discriminator"},
        comparable=False,
    ),
    "non-finite last micro-batch skipped": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam()),
        GAN_ROLES,
        micro_count=2,
        micro_off_on_rank_one={(2, 1): "nan"},
        comparable=False,
    ),
    "unused parameters": Scenario(
        lambda: Standard(OptimizerSpec("SGD", lr=0.1, momentum=0.9, weight_decay=0.1)),
        {"model": "loss"},
        model=lambda: Gan(spare=True),
        spare_on_rank_one=True,
        comparable=False,
    ),
    "unused parameters with accumulation": Scenario(
        lambda: Adversarial(
            generator=OptimizerSpec("SGD", lr=0.1, momentum=0.9, weight_decay=0.1),
            discriminator=_adam(),
        ),
        GAN_ROLES,
        model=lambda: Gan(spare=True),
        spare_on_rank_one=True,
        micro_count=2,
        comparable=False,
    ),
    "BatchNorm discriminator": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam()),
        GAN_ROLES,
        model=lambda: Gan(batchnorm=True),
        comparable=False,  # batch statistics are per rank (SyncBatchNorm needs a GPU)
    ),
    "BatchNorm discriminator two-phase": Scenario(
        lambda: Adversarial(generator=_adam(), discriminator=_adam(), two_phase=True, n_critic=2),
        GAN_ROLES,
        model=lambda: Gan(batchnorm=True),
        sequential=True,
        micro_count=2,
        comparable=False,
    ),
}


def global_batches(windows: int, micro_count: int) -> list[torch.Tensor]:
    """The run's global batches of a 2-rank world (the same on every rank; ``share`` cuts
    each rank's part, and one process trains on the whole batches)."""
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randn(HALF * 2, FEATURES, generator=generator) for _ in range(windows * micro_count)
    ]


def share(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch (all of it in one process)."""
    if not world.is_distributed:
        return batch
    size = batch.shape[0] // world.world_size
    return batch[world.rank * size : (world.rank + 1) * size]


def digest(model: nn.Module) -> str:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def updates_of(strategy: Any) -> dict[str, Any]:
    joint = getattr(strategy, "joint", None)
    updates = joint.updates if joint is not None else strategy.updates
    return {update.role: update for update in updates}


@attrs.define(eq=False)
class Reference:
    """The explicit average of the ranks' isolated local gradients, checked before each step."""

    scenario: Scenario
    model: Gan
    world: World
    names: dict[str, list[str]]
    window_model: Gan | None = None
    batches: list[torch.Tensor] = attrs.field(factory=list)
    window: int = 0
    excluded: set[tuple[int, str]] = attrs.field(factory=set)  # (micro-batch, role or "*")
    errors: list[tuple[int, str, float]] = attrs.field(factory=list)
    grads_none: list[tuple[int, str, list[str]]] = attrs.field(factory=list)

    def begin(self, window: int, batches: list[torch.Tensor]) -> None:
        self.window, self.batches = window, batches
        self.excluded = set()
        self.window_model = copy.deepcopy(self.model)

    def check(self, role: str) -> None:
        source = self.window_model if not self.scenario.sequential else copy.deepcopy(self.model)
        assert source is not None
        named = dict(source.named_parameters())
        params = [named[name] for name in self.names[role]]
        total = [torch.zeros_like(p) for p in params]
        for micro, batch in enumerate(self.batches):
            if {(micro, role), (micro, "*")} & self.excluded:
                continue
            loss = source(batch, **self.scenario.forward_kwargs(role))[self.scenario.losses[role]]
            grads = torch.autograd.grad(loss / len(self.batches), params, allow_unused=True)
            total = [t if g is None else t + g for t, g in zip(total, grads)]
        if self.world.is_distributed:
            for tensor in total:
                dist.all_reduce(tensor)
                tensor.div_(self.world.world_size)
        live = dict(self.model.named_parameters())
        actual = [live[name].grad for name in self.names[role]]
        none = [name for name, grad in zip(self.names[role], actual) if grad is None]
        if none:
            self.grads_none.append((self.window, role, none))
        error = max(
            float((t - (torch.zeros_like(t) if a is None else a)).abs().max())
            for t, a in zip(total, actual)
        )
        self.errors.append((self.window, role, error))


def run_scenario(name: str, world: World) -> dict[str, Any]:
    """Train scenario ``name`` for ``WINDOWS`` windows; what the rank saw."""
    scenario = SCENARIOS[name]
    torch.manual_seed(world.rank)  # ranks start different; rank 0's weights are broadcast
    model = scenario.model()
    broadcast_module(model, world)
    model.use_spare = scenario.spare_on_rank_one and world.rank == 1
    strategy = scenario.strategy()
    ctx = make_ctx(nonfinite="skip" if scenario.micro_off_on_rank_one else "raise")
    ctx.world = world
    strategy.setup(model, ctx)
    updates = updates_of(strategy)
    names_of = {id(p): n for n, p in model.named_parameters()}
    names = {role: [names_of[id(p)] for p in u.params] for role, u in updates.items()}
    reference = Reference(scenario, model, world, names)
    for role, update in updates.items():
        update.optimizer.register_step_pre_hook(
            lambda *_, role=role: reference.check(role)  # type: ignore[misc]
        )
    k = scenario.micro_count
    batches = global_batches(WINDOWS, k)
    digests, before_after = [], []
    for window in range(WINDOWS):
        window_batches = [share(b, world) for b in batches[window * k : (window + 1) * k]]
        reference.begin(window, window_batches)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        flag = scenario.off_on_rank_one.get(window)
        window_flags = {flag: torch.tensor(world.rank != 1)} if flag else {}
        for micro, batch in enumerate(window_batches):
            ctx.micro_index, ctx.micro_count = micro, k
            off = scenario.micro_off_on_rank_one.get((window, micro))
            model.flags = dict(window_flags)
            model.poison = off == "nan" and world.rank == 1
            if off == "nan":
                reference.excluded.add((micro, "*"))
            elif off is not None:
                model.flags[off] = torch.tensor(world.rank != 1)
                reference.excluded.add((micro, off.removeprefix("update_")))
            strategy.train_step(model, batch, ctx)
            ctx.progress.step += 1
        digests.append(digest(model))
        moved = {
            role: any(
                not torch.equal(before[n], dict(model.named_parameters())[n]) for n in role_names
            )
            for role, role_names in names.items()
        }
        before_after.append(moved)
    replicas = {role: update.replica for role, update in updates.items()}
    return {
        "errors": reference.errors,
        "grads_none": reference.grads_none,
        "skipped": ctx.progress.skipped_steps,
        "fallbacks": {role: u.replica.fallbacks for role, u in updates.items() if u.replica},
        "digests": digests,
        "moved": before_after,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "names": names,
        "replicas": {role: _replica_facts(r, names_of) for role, r in replicas.items()},
    }


def _replica_facts(replica: RoleReplica | None, names_of: dict[int, str]) -> dict[str, Any]:
    """What a role's DDP is: its parameters (by name), static_graph, find_unused."""
    if replica is None or replica.ddp is None:
        return {"built": False}
    ddp = replica.ddp
    return {
        "built": True,
        "params": [names_of[id(p)] for p in ddp.module.parameters()],
        "static_graph": ddp.static_graph,
        "find_unused": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "forward_sync_buffers": ddp.forward_sync_buffers,
        "unreached": [names_of[id(replica.params[i])] for i in replica.unreached],
    }


# ------------------------------------------------------------------- spawn


def _rank(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(folder)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        world = World(rank=rank, world_size=world_size)
        results = {name: run_scenario(name, world) for name in SCENARIOS}
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(folder: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """Every scenario on ``world_size`` gloo ranks; each rank's results, by rank."""
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _rank,
        args=(world_size, free_port(), str(folder)),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

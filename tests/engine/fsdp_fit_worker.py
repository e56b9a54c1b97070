"""What every rank of a 2-process gloo world runs for ``tests/engine/test_fsdp_fit.py``:
``Engine.fit`` with ``parallel="fsdp"`` (and ``"ddp"`` beside it, the reference).

``spawn(folder)`` starts the ranks with the environment ``torchrun`` would give them, so the
engine joins the process group itself; each rank saves what it observed to
``folder/rank<r>.pt``. One spawn runs every fit (torch takes seconds to start): Standard and
two-phase Adversarial (n_critic 2) under both, a resume from sharded checkpoints against the
uninterrupted run, bf16, HSDP meshes, and the refusals before training.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import callbacks
import strategies
from engine import Engine, EngineConfig, OptimizerSpec
from tests.helpers import spawn_ranks

FEATURES = 5
BATCH = 3  # per rank
N_TRAIN = 36  # 6 global batches of 2 x 3
N_EVAL = 7  # the last global eval batch leaves rank 1 nothing: it runs a zero-weight batch


class Tiny(nn.Module):
    """An autoencoder, a discriminator and a root parameter ``scale`` (its own FSDP unit is the
    root's). ``sample`` runs outside ``forward`` and reads ``scale``: it works sharded only when
    registered (``fsdp_forward_methods``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, 2))
        self.decoder = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, FEATURES))
        self.discriminator = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, 1))
        self.scale = nn.Parameter(torch.ones(FEATURES))

    def forward(self, batch: torch.Tensor, phase: str | None = None, **_: Any) -> dict[str, Any]:
        z = torch.tanh(self.encoder(batch))
        recon = self.decoder(z) * self.scale
        recon_loss = (recon - batch).pow(2).mean()
        real, fake = self.discriminator(batch), self.discriminator(recon)
        out = {
            "loss": recon_loss + 0.1 * z.pow(2).mean(),
            "autoencoder_loss": recon_loss + 0.3 * F.softplus(-fake).mean(),
            "discriminator_loss": F.softplus(-real).mean() + F.softplus(fake).mean(),
        }
        if phase == "discriminator":
            return {"discriminator_loss": out["discriminator_loss"]}
        if phase == "generator":
            return {"autoencoder_loss": out["autoencoder_loss"]}
        return out

    def sample(self, n: int) -> torch.Tensor:
        z = torch.linspace(-1.0, 1.0, 2 * n).reshape(n, 2)
        return self.decoder(z) * self.scale


class Switching(Tiny):
    """``Tiny`` whose first training forward switches the discriminator's update off and, with
    ``freeze``, that freezes the discriminator (``requires_grad_(False)``) in the generator's
    phase and unfreezes it in its own (the idiom of pix2pix's ``set_requires_grad``)."""

    def __init__(self, freeze: bool) -> None:
        super().__init__()
        self.freeze = freeze
        self.forwards = 0

    def forward(self, batch: torch.Tensor, phase: str | None = None, **_: Any) -> dict[str, Any]:
        if self.training and self.freeze:
            self.discriminator.requires_grad_(phase != "generator")
        out = super().forward(batch, phase)
        if self.training:
            self.forwards += 1
            if self.forwards == 1:
                out["update_discriminator"] = False
        return out


def train_data() -> torch.Tensor:
    return torch.randn(N_TRAIN, FEATURES, generator=torch.Generator().manual_seed(1))


def eval_data() -> torch.Tensor:
    return torch.randn(N_EVAL, FEATURES, generator=torch.Generator().manual_seed(2))


def _adam() -> OptimizerSpec:
    return OptimizerSpec("Adam", lr=0.02)


STRATEGIES: dict[str, Callable[[], Any]] = {
    "Standard": lambda: strategies.Standard(_adam()),
    "Adversarial two-phase n_critic 2": lambda: strategies.Adversarial(
        generator=_adam(), discriminator=_adam(), two_phase=True, n_critic=2
    ),
}


def config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "epochs": 2,
        "batch_size": BATCH,
        "device": "cpu",
        "output_dir": None,
        "log_every": 2,
        "distributed_timeout_s": 60.0,
        "grad_clip_norm": 0.5,  # clipped on DTensors under FSDP
    }
    values.update(overrides)
    return EngineConfig(**values)


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (collective under FSDP: every rank calls it)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


class Observer:
    """After every step a digest of the full parameters (ranks must agree); at the end the
    output of ``model.sample`` and the run itself (kept alive after ``fit``, as a callback that
    holds the run would)."""

    def __init__(self, model: Tiny) -> None:
        self.model = model
        self.digests: list[str] = []
        self.sample: torch.Tensor | None = None
        self.run: Any = None
        self.steps = 0
        self.initial = ""

    def on_fit_start(self, run: Any) -> None:
        self.initial = self._digest()

    def on_batch_end(self, run: Any) -> None:
        self.steps += 1
        self.digests.append(self._digest())

    def _digest(self) -> str:
        flat = torch.cat([p.flatten() for p in full_parameters(self.model).values()])
        return hashlib.sha256(flat.numpy().tobytes()).hexdigest()

    def on_fit_end(self, run: Any) -> None:
        self.run = run
        with torch.no_grad():
            sample = self.model.sample(2)
        self.sample = (sample.full_tensor() if isinstance(sample, DTensor) else sample).clone()


def fit(
    name: str,
    rank: int,
    epochs: int = 2,
    resume: Any = None,
    checkpoints: bool = False,
    make: Callable[[], Tiny] = Tiny,
    **kw: Any,
) -> dict[str, Any]:
    """Fit strategy ``name`` on the model ``make`` builds (``Tiny``) initialised from ``rank``
    (the engine broadcasts rank 0's weights); what it ended with."""
    torch.manual_seed(rank)
    model = make()
    strategy = STRATEGIES[name]()
    observer = Observer(model)
    extra = [callbacks.Checkpointing()] if checkpoints else []
    kw.setdefault("fsdp_forward_methods", ("sample",) if kw.get("parallel") == "fsdp" else ())
    result = Engine(strategy, config(epochs=epochs, **kw), [observer, *extra]).fit(
        model, train_data(), eval_data(), resume=resume
    )
    updates = strategy.updates if hasattr(strategy, "updates") else strategy.joint.updates
    return {
        "params": full_parameters(model),
        "history": result.history,
        "digests": observer.digests,
        "initial": observer.initial,
        "sample": observer.sample,
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "replicas_released": all(update.replica is None for update in updates),
        "run_kept": observer.run is not None,
        "run_dir": None if result.run_dir is None else str(result.run_dir),
    }


def refusal(name: str, rank: int, resume: Any = None, **kw: Any) -> tuple[str, str, int]:
    """The error a fit that must be refused raises, and how many steps it ran."""
    torch.manual_seed(rank)
    model = Tiny()
    observer = Observer(model)
    try:
        Engine(STRATEGIES[name](), config(**kw), [observer]).fit(model, train_data(), resume=resume)
    except Exception as error:
        return type(error).__name__, str(error), observer.steps
    return "no error", "", observer.steps


def scenario(rank: int, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in STRATEGIES:
        results[name] = {
            "ddp": fit(name, rank, parallel="ddp", output_dir=folder / "ddp", run_name=name),
            "fsdp": fit(name, rank, parallel="fsdp", fsdp_blocks=("Linear",)),
        }
    standard = "Standard"
    results["bf16"] = fit(standard, rank, parallel="fsdp", precision="bf16")
    results["hsdp"] = {
        str(mesh): fit(standard, rank, parallel="fsdp", fsdp_mesh=mesh) for mesh in [(1, 2), (2, 1)]
    }

    # bf16, the discriminator's update off in the first window (and the generator's phase not
    # in it: n_critic 2), the discriminator frozen in the generator's phase or not.
    results["switching"] = {
        freeze: fit(
            "Adversarial two-phase n_critic 2",
            rank,
            epochs=1,
            make=functools.partial(Switching, freeze),
            parallel="fsdp",
            precision="bf16",
        )
        for freeze in (False, True)
    }

    # Resume from sharded checkpoints: 1 epoch saved, then on to 3; the 3 epochs in one go.
    gan, place = "Adversarial two-phase n_critic 2", {"output_dir": folder, "run_name": "fsdp"}
    results["reference"] = fit(gan, rank, epochs=3, parallel="fsdp")
    fit(gan, rank, epochs=1, parallel="fsdp", checkpoints=True, **place)
    results["resumed"] = fit(gan, rank, 3, "last", checkpoints=True, parallel="fsdp", **place)

    # A full (DDP) checkpoint to resume under FSDP.
    ddp_place = {"output_dir": folder, "run_name": "ddp-run"}
    fit(gan, rank, epochs=1, parallel="ddp", checkpoints=True, **ddp_place)
    results["refusals"] = {
        "mesh": refusal(standard, rank, parallel="fsdp", fsdp_mesh=(3,)),
        "method": refusal(standard, rank, parallel="fsdp", fsdp_forward_methods=("generate",)),
        "block": refusal(standard, rank, parallel="fsdp", fsdp_blocks=("ResBlock",)),
        "fp16": refusal(standard, rank, parallel="fsdp", precision="fp16"),
        "full under fsdp": refusal(gan, rank, parallel="fsdp", **ddp_place, resume="last"),
        "sharded under ddp": refusal(gan, rank, parallel="ddp", **place, resume="last"),
    }
    # After every refusal the group still works.
    results["after_refusals"] = fit(standard, rank, epochs=1, parallel="fsdp")
    return results


def spawn(folder: Path, world_size: int = 2, deadline_s: float = 600.0) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` gloo ranks; each rank's result, by rank (a hang fails
    after ``deadline_s``: ``tests/helpers.py``'s ``spawn_ranks``)."""
    return spawn_ranks(scenario, folder, world_size, deadline_s)

"""What every rank of a 2-process gloo world runs for ``tests/callbacks/test_fsdp_callbacks.py``:
``Engine.fit`` with ``parallel="fsdp"`` and the callbacks that keep or run the model (``EMA``,
``SampleGrid``, ``Plots``), beside ``Checkpointing``.

``spawn(folder)`` starts the ranks with the environment ``torchrun`` would give them; each rank
saves what it observed to ``folder/rank<r>.pt``. One spawn runs every fit (torch takes seconds
to start):

* ``whole``: 2 epochs with ``fsdp_reshard_after_forward=False`` (the units stay gathered after
  a forward without backward, as evaluation and drawing leave them) and an EMA used for
  evaluation; the full parameters after every step, the EMA at the end;
* ``first`` then ``resumed``: the same run saved after epoch 1 and resumed to epoch 2 (with the
  default resharding): it must end bitwise where ``whole`` did;
* ``hsdp``: ``first`` on a 2-D mesh (replicated over 1 rank, sharded over 2);
* ``quality``: ``QualityMetrics`` of samples and of reconstructions, 3 batches each (2 on rank
  0, 1 on rank 1: rank 1 pads), with the default ``fsdp_reshard_after_forward=True`` (so each
  model call all-gathers); the full parameters and the measured values at every EPOCH_END;
* ``refusals``: callbacks whose model method would not gather its parameters under FSDP.

Each rank works in a folder of its own (``cwd<r>``), so a file written by a rank other than 0
to a relative path shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import callbacks
import strategies
from callbacks import EMA, Plots, QualityMetrics, SampleGrid
from callbacks.quality import RandomConvFeatures
from engine import Engine, EngineConfig, OptimizerSpec, RunState
from tests.helpers import spawn_ranks

SIDE = 4  # images are 1 x SIDE x SIDE
BATCH = 3  # per rank
N_TRAIN = 24  # 4 global batches of 2 x 3 per epoch
EPOCHS = 2
DECAY = 0.6  # a fixed decay: the EMA differs from the raw weights
RUN = "fsdp"


class TinyImageAE(nn.Module):
    """An autoencoder of 1 x 4 x 4 images with a root parameter ``scale`` (in the root's FSDP
    unit): ``sample`` (noise, or a count) reads it, so it works sharded only when registered
    (``fsdp_forward_methods=("sample",)``)."""

    latent_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 6), nn.Tanh())
        self.head = nn.Linear(6, 2)
        self.decoder = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, SIDE * SIDE))
        self.scale = nn.Parameter(torch.ones(SIDE * SIDE))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.decoder(z) * self.scale).view(-1, 1, SIDE, SIDE))  # no view out

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        batch = batch["data"] if isinstance(batch, Mapping) else batch  # QualityMetrics' input
        recon = self._decode(torch.tanh(self.head(self.encoder(batch))))
        return {"loss": (recon - batch).pow(2).mean(), "recon_x": recon}

    def sample(self, noise: torch.Tensor | int) -> torch.Tensor:
        if isinstance(noise, int):
            noise = torch.linspace(-1.0, 1.0, 2 * noise).reshape(noise, 2)
        return self._decode(noise)


def train_data() -> torch.Tensor:
    return torch.rand(N_TRAIN, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def eval_data() -> torch.Tensor:
    return torch.rand(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2))


def config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "device": "cpu",
        "output_dir": None,
        "run_name": RUN,
        "distributed_timeout_s": 60.0,
        "parallel": "fsdp",
        "fsdp_forward_methods": ("sample",),
    }
    values.update(overrides)
    return EngineConfig(**values)


def picture_callbacks() -> list[Any]:
    """The callbacks under test, as a one-process reference builds them too."""
    images = eval_data()
    return [
        EMA(decay=DECAY, use_for_eval=True),
        SampleGrid(
            image_batch=images,
            reconstructions=True,
            num_samples=4,
            columns=4,
            strip_columns=4,
            dpi=30,
        ),
        Plots(image_batch=images, num_samples=4, columns=4, figsize=(2.0, 3.0), dpi=30),
    ]


QUALITY_SAMPLES = 10  # batches of 4, 4 and 2: rank 0 measures two, rank 1 one and pads


def quality_callbacks() -> list[QualityMetrics]:
    """FID/KID of samples (``eval/...``) and of reconstructions (``recon/...``) of the first
    ``QUALITY_SAMPLES`` reference images, as a one-process reference builds them too. KID is
    exact over the ranks here: each reservoir holds every feature and the one KID subset holds
    them all on both sides (a smaller subset is drawn from the features in rank order, not in
    one process's order)."""
    reference = torch.rand(
        QUALITY_SAMPLES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(3)
    )
    common: dict[str, Any] = {
        "reference": reference,
        "num_samples": QUALITY_SAMPLES,
        "batch_size": 4,
        "kid_reservoir": 64,
        "kid_subsets": 1,
        "kid_subset_size": 64,
    }
    return [
        QualityMetrics(extractor=RandomConvFeatures(dim=8, size=8), **common),
        QualityMetrics(
            extractor=RandomConvFeatures(dim=8, size=8),
            source="reconstructions",
            prefix="recon",
            **common,
        ),
    ]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole (an all-gather for a DTensor: every rank calls it)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class Recorder:
    """The full parameters at the start and after every step (collective: every rank), and at
    the end the EMA as ``state_dict`` and ``averaged`` give it, the size of this rank's EMA
    shards and the files this rank reports."""

    priority = -10  # after the EMA

    def __init__(self, model: nn.Module, ema: EMA) -> None:
        self.model, self.ema = model, ema
        self.trajectory: list[dict[str, torch.Tensor]] = []
        self.end: dict[str, Any] = {}

    def _params(self) -> dict[str, torch.Tensor]:
        return {name: full(param) for name, param in self.model.named_parameters()}

    def on_fit_start(self, run: RunState) -> None:
        self.trajectory = [self._params()]

    def on_batch_end(self, run: RunState) -> None:
        self.trajectory.append(self._params())

    def on_fit_end(self, run: RunState) -> None:
        averaged = self.ema.averaged
        self.end = {
            "params": self._params(),
            "ema_state": self.ema.state_dict(),
            "averaged": {name: full(value) for name, value in averaged.items()},
            "local_numel": sum(
                (v.to_local() if isinstance(v, DTensor) else v).numel() for v in averaged.values()
            ),
            "paths": sorted(run.paths),
            "run_dir": None if run.run_dir is None else str(run.run_dir),
        }


def fit(folder: Path, epochs: int, resume: Any = None, **overrides: Any) -> dict[str, Any]:
    """One FSDP fit of ``TinyImageAE`` with the picture callbacks and checkpoints; what the
    recorder saw."""
    torch.manual_seed(0)
    model = TinyImageAE()
    pictures = picture_callbacks()
    recorder = Recorder(model, pictures[0])
    engine = Engine(
        strategies.Standard(OptimizerSpec("Adam", lr=0.05)),
        config(epochs=epochs, output_dir=folder, **overrides),
        [*pictures, callbacks.Checkpointing(), recorder],
    )
    engine.fit(model, train_data(), eval_data(), resume=resume)
    return {"trajectory": recorder.trajectory, **recorder.end}


class QualityRecorder:
    """At every EPOCH_END, after ``QualityMetrics``: the full parameters (collective) and the
    values measured."""

    priority = -10

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.epochs: list[dict[str, Any]] = []

    def on_epoch_end(self, run: RunState) -> None:
        params = {name: full(param) for name, param in self.model.named_parameters()}
        measured = {
            key: value
            for key, value in run.epoch_metrics.items()
            if key.startswith(("eval/", "recon/"))
        }
        self.epochs.append({"params": params, "metrics": measured})


def fit_quality() -> list[dict[str, Any]]:
    """An FSDP fit with ``QualityMetrics`` of samples and reconstructions; what was measured
    at each epoch's end, with the weights it was measured on."""
    torch.manual_seed(0)
    model = TinyImageAE()
    recorder = QualityRecorder(model)
    engine = Engine(
        strategies.Standard(OptimizerSpec("Adam", lr=0.05)),
        config(),  # each unit all-gathers at every forward: a call missing on a rank hangs
        [*quality_callbacks(), recorder],
    )
    engine.fit(model, train_data())
    return recorder.epochs


class Steps:
    def __init__(self) -> None:
        self.count = 0

    def on_batch_end(self, run: RunState) -> None:
        self.count += 1


def refusal(callback: Any, **overrides: Any) -> tuple[str, str, int]:
    """The error a fit with ``callback`` raises, and how many steps it ran first."""
    torch.manual_seed(0)
    steps = Steps()
    engine = Engine(
        strategies.Standard(OptimizerSpec("Adam", lr=0.05)),
        config(epochs=1, **overrides),
        [callback, steps],
    )
    try:
        engine.fit(TinyImageAE(), train_data())
    except Exception as error:
        return type(error).__name__, str(error), steps.count
    return "no error", "", steps.count


def scenario(rank: int, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["whole"] = fit(folder / "whole", EPOCHS, fsdp_reshard_after_forward=False)
    results["first"] = fit(folder / "resumed", 1)
    results["resumed"] = fit(folder / "resumed", EPOCHS, resume="last")
    results["hsdp"] = fit(folder / "hsdp", 1, fsdp_mesh=(1, 2))  # (Replicate, Shard) placements
    results["quality"] = fit_quality()
    unregistered = {"fsdp_forward_methods": ()}
    results["refusals"] = {
        "QualityMetrics sample": refusal(quality_callbacks()[0], **unregistered),
        "SampleGrid sample": refusal(SampleGrid(num_samples=2), **unregistered),
        "Plots sample": refusal(Plots(image_batch=eval_data()), **unregistered),
        "SampleGrid submodule": refusal(SampleGrid(num_samples=2, method="encoder.1")),
    }
    return results


def spawn(folder: Path, world_size: int = 2, deadline_s: float = 300.0) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` gloo ranks; each rank's result, by rank (a hang fails
    after ``deadline_s``: ``tests/helpers.py``'s ``spawn_ranks``)."""
    return spawn_ranks(scenario, folder, world_size, deadline_s, own_cwd=True)

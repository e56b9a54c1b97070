"""Scenarios that every rank of a small gloo world runs, for ``tests/engine/test_distributed.py``.

``spawn(scenario, folder)`` starts the processes with the environment ``torchrun`` would give
them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the engine
joins the process group itself. Each rank saves what it observed to ``folder/rank<r>.pt``; the
test process loads those and asserts. Torch takes seconds to start, so one spawn runs many
fits (each of which joins and leaves the process group: a second ``fit`` in one process works).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import callbacks as callback_package
import strategies
from callbacks import ConsoleMetrics, MetricsHistory, ProgressBar
from engine import CHECKPOINT_PRIORITY, DataError, Engine, EngineConfig, OptimizerSpec
from engine.distributed.session import leave_process_group
from tests.helpers import gloo_worker_threads, spawn_ranks

N_TRAIN = 48  # 6 global batches of 2 x 4
N_EVAL = 9  # the last global eval batch leaves rank 1 nothing: no padding, no duplicate
BATCH = 4
FEATURES = 6


# ------------------------------------------------------------------ models


def record(
    batch: dict[str, torch.Tensor], training: bool, seen: list[int], eval_seen: list[int]
) -> None:
    """Remembers the ``index`` of every sample of ``batch``: in ``seen`` while training, in
    ``eval_seen`` in evaluation."""
    (seen if training else eval_seen).extend(batch["index"].tolist())


class Autoencoder(nn.Module):
    """Deterministic AE; optional ``discriminator`` on the code for the adversarial roles.
    Records the ``index`` of every sample it sees, in training and in evaluation."""

    def __init__(self, discriminator: bool = False) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.eval_seen: list[int] = []
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, FEATURES))
        self.discriminator = (
            nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)) if discriminator else None
        )

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        record(batch, self.training, self.seen, self.eval_seen)
        x = batch["data"]
        z = self.encoder(x)
        recon = (self.decoder(z) - x).pow(2).sum(1).mean()
        out = {"loss": recon, "encoder_loss": recon + 0.1 * z.pow(2).sum(1).mean()}
        out["decoder_loss"] = recon
        out["z"] = z  # a per-sample output, for predict
        if self.discriminator is not None:
            prior = torch.cos(x[:, :3] * 3.0)  # a deterministic stand-in for prior samples
            fake, real = self.discriminator(z), self.discriminator(prior)
            ones, zeros = torch.ones_like(fake), torch.zeros_like(fake)
            adversarial = F.binary_cross_entropy_with_logits(fake, ones)
            out["autoencoder_loss"] = recon + 0.5 * adversarial
            out["encoder_loss"] = out["encoder_loss"] + 0.5 * adversarial
            out["discriminator_loss"] = F.binary_cross_entropy_with_logits(
                real, ones
            ) + F.binary_cross_entropy_with_logits(fake, zeros)
        return out


class PartlyUsed(nn.Module):
    """``extra`` gets a gradient only where ``use_extra`` is set (one rank); ``unused`` never.
    Records the ``index`` of every sample it sees, as ``Autoencoder`` does."""

    def __init__(self, use_extra: bool) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.eval_seen: list[int] = []
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.extra = nn.Parameter(torch.ones(FEATURES))
        self.unused = nn.Parameter(torch.ones(FEATURES))
        self.use_extra = use_extra

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        record(batch, self.training, self.seen, self.eval_seen)
        x = batch["data"]
        y = self.linear(x)
        if self.use_extra:
            y = y * self.extra
        return {"loss": (y - x.flip(1)).pow(2).mean()}


class Normed(nn.Module):
    """A BatchNorm model: each rank's running statistics follow its own batches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES))

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.body(x) - x.flip(1)).pow(2).mean()}


class FailsAtStep(nn.Module):
    """Raises in its forward at training step ``fail_at`` (counted from 0) when armed."""

    def __init__(self, fail_at: int | None) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        if self.training and self.calls == self.fail_at:
            raise ValueError(f"deliberate failure at step {self.calls}")
        self.calls += 1
        return {"loss": self.linear(batch["data"]).pow(2).mean()}


class HangsAtStep(nn.Module):
    """At training step ``hang_at`` (when armed) its forward waits, alive and in no collective,
    until the file ``release`` exists (at most ``limit_s``); ``released`` says whether it did."""

    def __init__(self, hang_at: int | None, release: Path, limit_s: float) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.hang_at, self.release, self.limit_s = hang_at, release, limit_s
        self.calls = 0
        self.released: bool | None = None

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        if self.training and self.calls == self.hang_at:
            self.released = _wait_for_file(self.release, self.limit_s)
        self.calls += 1
        return {"loss": self.linear(batch["data"]).pow(2).mean()}


class SlowFitEnd:
    """On rank 0, the last FIT_END handler (after ``Checkpointing``, whose last save may wait
    for the other ranks): waits a moment, then writes ``marker``. A rank whose ``fit`` returned
    before rank 0's FIT_END handlers were done would not see it."""

    priority = CHECKPOINT_PRIORITY - 1

    def __init__(self, marker: Path, delay_s: float = 1.5) -> None:
        self.marker, self.delay_s = marker, delay_s

    def on_fit_end(self, run: Any) -> None:
        if run.is_main_process:
            time.sleep(self.delay_s)
            self.marker.write_text("rank 0's FIT_END handlers ran")


def _wait_for_file(path: Path, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def file_barrier(
    folder: Path, name: str, rank: int, world_size: int, limit_s: float = 120.0
) -> None:
    """Every rank waits here until all have arrived (through files: before any process group),
    so that they join within moments of each other."""
    (folder / f"{name}-{rank}").write_text("here")
    for other in range(world_size):
        if not _wait_for_file(folder / f"{name}-{other}", limit_s):
            raise TimeoutError(f"rank {other} did not reach {name!r} within {limit_s} s")


# --------------------------------------------------------------- strategies


def _adam() -> OptimizerSpec:
    return OptimizerSpec("Adam", lr=1e-2)


STRATEGIES: dict[str, tuple[Callable[[], Any], bool]] = {
    # name: (strategy factory, whether the model needs a discriminator)
    "Standard": (lambda: strategies.Standard(_adam()), False),
}
if hasattr(strategies, "Adversarial"):
    STRATEGIES["Adversarial"] = (
        lambda: strategies.Adversarial(generator=_adam(), discriminator=_adam()),
        True,
    )
if hasattr(strategies, "Coupled"):
    STRATEGIES["Coupled"] = (lambda: strategies.Coupled(encoder=_adam(), decoder=_adam()), False)
if hasattr(strategies, "CoupledAdversarial"):
    STRATEGIES["CoupledAdversarial"] = (
        lambda: strategies.CoupledAdversarial(
            encoder=_adam(), decoder=_adam(), discriminator=_adam()
        ),
        True,
    )


# --------------------------------------------------------------------- data


def train_data(n: int = N_TRAIN) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"data": torch.randn(n, FEATURES, generator=generator), "index": torch.arange(n)}


def eval_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        "data": torch.randn(N_EVAL, FEATURES, generator=generator),
        "index": torch.arange(N_EVAL),
    }


class MapDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """A map-style dataset over ``train_data()``: the DataLoader path, not the fast path."""

    def __init__(self) -> None:
        self.data = train_data()

    def __len__(self) -> int:
        return N_TRAIN

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.data.items()}


class StopOnRank:
    """Calls ``engine.stop()`` on one rank only, after step ``at_step``."""

    def __init__(self, rank: int, at_step: int) -> None:
        self.rank, self.at_step = rank, at_step

    def on_batch_end(self, run: Any) -> None:
        if run.context.world.rank == self.rank and run.progress.step == self.at_step:
            run.engine.stop()


class Stream(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """The first ``n`` samples of ``train_data()`` as a stream: no length, one per rank."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Any:
        data = train_data()
        return ({key: value[index] for key, value in data.items()} for index in range(self.n))


def config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "epochs": 2,
        "batch_size": BATCH,
        "device": "cpu",
        "output_dir": None,
        "log_every": 2,
        "distributed_timeout_s": 60.0,
    }
    values.update(overrides)
    return EngineConfig(**values)


class EpochSamples:
    """Moves the model's recorded sample indices into one list per epoch."""

    def __init__(self, model: Autoencoder) -> None:
        self.model = model
        self.epochs: list[list[int]] = []
        self.eval_epochs: list[list[int]] = []

    def on_fit_start(self, run: Any) -> None:
        """Forget the pre-flight forward (engine/preflight.py: one eval-mode batch before the
        first step), which is no evaluation."""
        self.model.seen.clear()
        self.model.eval_seen.clear()

    def on_epoch_end(self, run: Any) -> None:
        self.epochs.append(list(self.model.seen))
        self.eval_epochs.append(list(self.model.eval_seen))
        self.model.seen.clear()
        self.model.eval_seen.clear()


class StepHashes:
    """A digest of every parameter's bytes after each step: ranks must agree at every step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.digests: list[str] = []

    def on_batch_end(self, run: Any) -> None:
        flat = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        self.digests.append(hashlib.sha256(flat.numpy().tobytes()).hexdigest())


def state_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) inside nested dicts and lists, by its path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        found[prefix] = value.detach().clone()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found[prefix] = torch.tensor(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.update(state_tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(state_tensors(item, f"{prefix}/{index}"))
    return found


def train_strategy(
    name: str, rank_seed: int, batch_size: int = BATCH, samples: int = N_TRAIN, **overrides: Any
) -> dict:
    """Fit strategy ``name`` from a model initialised with ``rank_seed``; what it ended with."""
    factory, needs_discriminator = STRATEGIES[name]
    torch.manual_seed(rank_seed)  # ranks start different: the engine broadcasts rank 0's
    model = Autoencoder(discriminator=needs_discriminator)
    strategy = factory()
    seen, hashes = EpochSamples(model), StepHashes(model)
    result = Engine(strategy, config(batch_size=batch_size, **overrides), [seen, hashes]).fit(
        model, train_data(samples), eval_data()
    )
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": state_tensors(strategy.state_dict()),
        "history": result.history,
        "samples": seen.epochs,
        "eval_samples": seen.eval_epochs,
        "step_digests": hashes.digests,
    }


def random_cases(count: int = 8, seed: int = 5) -> list[dict[str, Any]]:
    """Seeded random runs (the same list on every rank and in the test process): strategy,
    data size, batch, drop_last, shuffle, accumulation, clipping, precision, epochs."""
    rng = random.Random(seed)
    return [
        {
            "name": list(STRATEGIES)[number % len(STRATEGIES)],
            "samples": rng.randint(6, 40),
            "batch_size": rng.randint(1, 6),
            "drop_last": rng.random() < 0.3,
            "shuffle": rng.random() < 0.8,
            "accumulate_steps": rng.randint(1, 3),
            "grad_clip_norm": rng.choice([None, 0.5]),
            "precision": rng.choice(["fp32", "fp32", "bf16"]),
            "epochs": rng.randint(1, 2),
        }
        for number in range(count)
    ]


def train_case(case: dict[str, Any], rank_seed: int, ranks: int) -> Any:
    """``train_strategy`` for a ``random_cases`` entry with the global batch of ``ranks``
    processes of ``case["batch_size"]``; a refusal is returned as ``("DataError", message)``."""
    values = dict(case)
    values["batch_size"] = case["batch_size"] * ranks
    try:
        return train_strategy(values.pop("name"), rank_seed, **values)
    except DataError as error:
        return ("DataError", str(error))


def train_resumable(
    rank_seed: int,
    epochs: int,
    folder: Path | None = None,
    resume: str | None = None,
    batch_size: int = BATCH,
) -> dict[str, torch.Tensor]:
    """Standard on the AE with a checkpoint every epoch in ``folder/run`` (rank 0 writes)."""
    callbacks = [] if folder is None else [callback_package.Checkpointing()]
    overrides: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size}
    if folder is not None:
        overrides.update(output_dir=folder, run_name="run")
    torch.manual_seed(rank_seed)
    model = Autoencoder()
    Engine(strategies.Standard(_adam()), config(**overrides), callbacks).fit(
        model, train_data(), eval_data(), resume=resume
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- scenarios


def scenario_training(rank: int, folder: Path) -> dict[str, Any]:
    """Every strategy, the DataLoader path, gradients missing on a rank, rank-0-only files,
    then a rank that fails."""
    results: dict[str, Any] = {"strategies": {}}
    for name in STRATEGIES:
        results["strategies"][name] = train_strategy(name, rank_seed=rank)
    results["accumulate"] = train_strategy("Standard", rank_seed=rank, accumulate_steps=2)
    results["random_cases"] = [train_case(case, rank, ranks=1) for case in random_cases()]

    # Rank 1 alone asks to stop after step 3; with log_every=2 both ranks stop after step 4.
    stopping = Engine(strategies.Standard(_adam()), config(epochs=3), [StopOnRank(1, at_step=3)])
    stopped = stopping.fit(Autoencoder(), train_data())
    results["stop_on_one_rank"] = {"steps": stopped.steps, "stopped": stopped.stopped_early}

    # Streams of unequal length (9 and 6 batches): windows of 4, every rank runs 4 + 2 steps.
    torch.manual_seed(0)
    model = Autoencoder()
    uneven = Engine(strategies.Standard(_adam()), config(epochs=1, accumulate_steps=4)).fit(
        model, Stream(BATCH * (9 if rank == 0 else 6))
    )
    results["uneven_streams"] = {
        "steps": uneven.steps,
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }

    torch.manual_seed(rank)
    model = Autoencoder()
    samples = EpochSamples(model)
    Engine(strategies.Standard(_adam()), config(), [samples]).fit(model, MapDataset())
    results["loader_samples"] = samples.epochs

    partly = PartlyUsed(use_extra=rank == 1)
    sgd = OptimizerSpec("SGD", lr=0.1, momentum=0.9, weight_decay=0.1)
    Engine(strategies.Standard(sgd), config(epochs=1)).fit(partly, train_data())
    results["partly_used"] = {k: v.detach().clone() for k, v in partly.state_dict().items()}

    # Evaluate one sample (rank 1 has no batch at all) with BatchNorm statistics that differ.
    normed = Normed()
    Engine(strategies.Standard(_adam()), config(epochs=1)).fit(normed, train_data())
    one = {key: value[:1] for key, value in eval_data().items()}
    results["one_sample_eval"] = Engine(strategies.Standard(_adam()), config()).evaluate(
        normed, one
    )
    results["normed"] = {k: v.detach().clone() for k, v in normed.state_dict().items()}

    output = folder / f"output-rank{rank}"
    files_config = config(epochs=1, output_dir=output, run_name="run")
    callbacks = [MetricsHistory(), ConsoleMetrics(), ProgressBar(disable=True)]
    checkpointing = getattr(callback_package, "Checkpointing", None)
    if checkpointing is not None:
        callbacks.append(checkpointing())
    torch.manual_seed(rank)
    fitted = Engine(strategies.Standard(_adam()), files_config, callbacks).fit(
        Autoencoder(), train_data(), eval_data()
    )
    results["files"] = sorted(str(path.relative_to(output)) for path in output.rglob("*"))
    results["run_dir"] = None if fitted.run_dir is None else str(fitted.run_dir)

    # Resume: 1 epoch with checkpoints (rank 0 writes), then continue to 3 epochs; the same
    # 3 epochs in one go are the reference.
    results["resume_reference"] = train_resumable(rank, epochs=3)
    train_resumable(rank, epochs=1, folder=folder / "resume")
    results["resumed"] = train_resumable(rank, epochs=3, folder=folder / "resume", resume="last")

    # When fit returns on rank 1, rank 0's FIT_END handlers and files are done (closing barrier).
    shared = folder / "closing"
    shared.mkdir(exist_ok=True)
    marker = shared / "rank0-fit-end-done"
    closing_callbacks = [SlowFitEnd(marker), callback_package.Checkpointing()]
    Engine(
        strategies.Standard(_adam()),
        config(epochs=1, output_dir=shared, run_name="run"),
        closing_callbacks,
    ).fit(Autoencoder(), train_data())
    results["after_fit"] = {
        "marker": marker.exists(),
        "model_final": (shared / "run" / "model_final.pt").exists(),
        "last": (shared / "run" / "checkpoints" / "last" / "COMPLETE").exists(),
    }

    # Every rank predicts all of the data (with the same weights on every rank).
    torch.manual_seed(0)
    results["predict"] = Engine(strategies.Standard(_adam()), config()).predict(
        Autoencoder(), eval_data()
    )

    failing = FailsAtStep(fail_at=3 if rank == 1 else None)
    started = time.perf_counter()
    try:
        Engine(strategies.Standard(_adam()), config(epochs=3)).fit(failing, train_data())
        results["failure"] = None
    except Exception as error:
        results["failure"] = (type(error).__name__, str(error))
    results["failure_seconds"] = time.perf_counter() - started
    # Leaving joins gloo's worker threads, even after a failure (none outlives the interpreter).
    leave_process_group()
    results["gloo_threads_after_leave"] = gloo_worker_threads()
    return results


def scenario_torchrun(rank: int, folder: Path) -> dict[str, Any]:
    """Under the real launcher: two fits in one process (the second reuses the group), then
    leaving the group."""
    first = train_resumable(rank, epochs=1)
    second = train_resumable(rank, epochs=1)
    threads_in_group = gloo_worker_threads()
    leave_process_group()
    return {
        "first": first,
        "second": second,
        "rank": rank,
        "gloo_threads": (threads_in_group, gloo_worker_threads()),
    }


HUNG_TIMEOUT_S = 5.0
HUNG_LIMIT_S = 90.0


def scenario_hung(rank: int, folder: Path) -> dict[str, Any]:
    """Rank 1 hangs in its forward at step 2 (alive, in no collective) until rank 0 has given
    up; rank 0's gradient all-reduce must fail at ``distributed_timeout_s`` (this fit joins the
    group, so its timeout is the group's), long before rank 1's own limit."""
    file_barrier(folder, "ready", rank, 2)
    release = folder / "rank0-gave-up"
    model = HangsAtStep(2 if rank == 1 else None, release, HUNG_LIMIT_S)
    result: dict[str, Any] = {"failure": None}
    try:
        Engine(
            strategies.Standard(_adam()), config(epochs=3, distributed_timeout_s=HUNG_TIMEOUT_S)
        ).fit(model, train_data())
    except Exception as error:
        result["failure"] = (type(error).__name__, str(error))
    if rank == 0:
        release.write_text("rank 0 stopped")
    result["released"] = model.released
    return result


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "training": scenario_training,
    "torchrun": scenario_torchrun,
    "hung": scenario_hung,
}


# ------------------------------------------------------------------- spawn


def spawn(
    scenario: str, folder: Path, world_size: int = 2, deadline_s: float = 900.0
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` gloo ranks; each rank's result, by rank (a hang fails
    after ``deadline_s``: ``tests/helpers.py``'s ``spawn_ranks``)."""
    return spawn_ranks(SCENARIOS[scenario], folder, world_size, deadline_s)


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... -m <this> NAME DIR
    import sys

    torch.set_num_threads(1)
    name, where = sys.argv[1], Path(sys.argv[2])
    own_rank = int(os.environ["RANK"])
    try:
        outcome = SCENARIOS[name](own_rank, where)
    finally:
        leave_process_group()
    torch.save(outcome, where / f"rank{own_rank}.pt")

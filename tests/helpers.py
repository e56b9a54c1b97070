"""Small models, data and an event recorder shared by the tests."""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp
from torch import nn

from engine import Event, RunState
from engine.distributed.session import leave_process_group
from engine.state import Progress

if TYPE_CHECKING:  # a worker that imports this module must not import the whole engine
    from engine import Engine

Scenario = Callable[[int, Path], Any]


class TinyRegressor(nn.Module):
    """``loss`` = mean squared error of a linear map; deterministic given the seed."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"] if isinstance(batch, dict) else batch
        if isinstance(x, (list, tuple)):
            x = x[0]
        prediction = self.linear(x)
        return {"loss": (prediction - x.flip(-1)).pow(2).mean(), "prediction": prediction}


class PythaeStyleAE(nn.Module):
    """Takes ``{"data": x}`` and returns an ``OrderedDict`` with ``loss``, as pythae's models do."""

    def __init__(self, features: int = 16, latent: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, 32), nn.ReLU(), nn.Linear(32, features))

    def forward(self, inputs: dict[str, torch.Tensor], **_: Any) -> OrderedDict[str, torch.Tensor]:
        x = inputs["data"]
        z = self.encoder(x)
        recon_x = self.decoder(z)
        loss = (recon_x - x).pow(2).sum(1).mean()
        return OrderedDict(loss=loss, recon_x=recon_x, z=z)


class EventRecorder:
    """Records every event in order (and the step at which it fired)."""

    def __init__(self, priority: int = 0) -> None:
        self.priority = priority
        self.events: list[Event] = []
        self.steps: list[int] = []

    def _record(self, event: Event, run: RunState) -> None:
        self.events.append(event)
        self.steps.append(run.progress.step)

    def on_fit_start(self, run: RunState) -> None:
        self._record(Event.FIT_START, run)

    def on_epoch_start(self, run: RunState) -> None:
        self._record(Event.EPOCH_START, run)

    def on_batch_start(self, run: RunState) -> None:
        self._record(Event.BATCH_START, run)

    def on_batch_end(self, run: RunState) -> None:
        self._record(Event.BATCH_END, run)

    def on_eval_start(self, run: RunState) -> None:
        self._record(Event.EVAL_START, run)

    def on_eval_end(self, run: RunState) -> None:
        self._record(Event.EVAL_END, run)

    def on_epoch_end(self, run: RunState) -> None:
        self._record(Event.EPOCH_END, run)

    def on_fit_end(self, run: RunState) -> None:
        self._record(Event.FIT_END, run)

    def on_exception(self, run: RunState) -> None:
        self._record(Event.EXCEPTION, run)

    def count(self, event: Event) -> int:
        return self.events.count(event)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def run_state_of(
    engine: Engine, model: nn.Module, run_dir: Path | None = None, progress: Progress | None = None
) -> RunState:
    """The ``RunState`` ``engine``'s callbacks would see for ``model``, outside a fit: for
    calling a callback's hooks or measures by hand."""
    return RunState(
        engine=engine,
        model=model,
        strategy=engine.strategy,
        config=engine.config,
        progress=progress if progress is not None else Progress(),
        run_dir=run_dir,
        steps_per_epoch=None,
    )


# ------------------------------------------------------------------ several processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_rank_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun would set for this rank on one machine; one torch thread per rank."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def gloo_worker_threads() -> int | None:
    """How many of gloo's worker threads this process runs (Linux names them), else None."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue  # a thread that ended meanwhile
    return names.count("pt_gloo_runloop")


def _run_rank(
    rank: int, scenario: Scenario, world_size: int, port: int, folder: str, own_cwd: bool
) -> None:
    """One spawned rank: ``scenario(rank, folder)``; its result is saved as ``rank<N>.pt``, its
    traceback (if any) as ``rank<N>.error``; the process group is left either way."""
    set_rank_environment(rank, world_size, port)
    out = Path(folder)
    if own_cwd:  # a working folder of its own: files written by mistake are seen there
        (out / f"cwd{rank}").mkdir()
        os.chdir(out / f"cwd{rank}")
    try:
        result = scenario(rank, out)
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_process_group()
    torch.save(result, out / f"rank{rank}.pt")


def spawn_ranks(
    scenario: Scenario,
    folder: Path,
    world_size: int = 2,
    deadline_s: float = 300.0,
    own_cwd: bool = False,
) -> list[Any]:
    """Run the module-level function ``scenario(rank, folder)`` on ``world_size`` gloo ranks
    (spawned, with the environment torchrun would give them); each rank's result, by rank.
    Ranks still running after ``deadline_s`` (a hang) are killed and the call fails."""
    folder.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _run_rank,
        args=(scenario, world_size, free_port(), str(folder), own_cwd),
        nprocs=world_size,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            name = getattr(scenario, "__qualname__", scenario)
            raise AssertionError(f"{name} still ran on the ranks after {deadline_s} s: a hang")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

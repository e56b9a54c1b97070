"""The trainers a benchmark compares, for one-loss models (``Standard``).

``floor``: a hand-written loop over slices of a pre-shuffled copy of the data (the least work a
loop can do); ``dataloader``: the usual hand-written loop over a ``DataLoader``; ``engine``: our
``Engine`` with ``Standard``. Each hand-written loop takes the optimiser it is given, so the
engine can be compared with the same optimiser implementation (fused Adam, the engine's default
on CPU and CUDA) and with plain Adam (torch's default, what a hand-written loop usually uses).

A timed epoch is a whole one-epoch run: every trainer seeds and builds its optimiser inside the
clock, as ``Engine.fit`` does; the model copy is made outside it. The floor seeds and shuffles
as the engine does (seed 0, the same permutation), so from the same initial model both compute
bitwise the same parameters (``tests/benchmarks/test_same_arithmetic.py``): the difference in
time is the engine's own work, not a different trajectory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import EpochFn, Marks, Runner, Timed
from engine import Engine, EngineConfig, Event, OptimizerSpec
from strategies import Standard

ModelFactory = Callable[[], torch.nn.Module]
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
LR = 1e-3


def fused_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam as the engine builds it by default: the fused kernel."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)


def default_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam as torch builds it by default (the foreach implementation)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)


def fresh(template: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of the shared initial model on ``device``, so every runner starts alike."""
    return copy.deepcopy(template).to(device)


def sliced_epoch(
    model: torch.nn.Module,
    make_optimizer: OptimizerFactory,
    data: torch.Tensor,
    batch_size: int,
) -> EpochFn:
    """One epoch over slices of a shuffled copy of ``data``; losses read once at the end."""

    def epoch() -> int:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        optimizer = make_optimizer(model)
        order = torch.randperm(len(data), generator=generator).to(data.device)
        shuffled = data.index_select(0, order)
        losses = []
        model.train()
        for lo in range(0, len(data), batch_size):
            loss = model({"data": shuffled[lo : lo + batch_size]})["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.stack(losses).mean().item()
        return len(losses)

    return epoch


def dataloader_epoch(
    model: torch.nn.Module,
    make_optimizer: OptimizerFactory,
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> EpochFn:
    """One epoch over a shuffling ``DataLoader`` (per-sample indexing and collation)."""
    loader = DataLoader(
        TensorDataset(data.cpu()),
        batch_size=batch_size,
        shuffle=True,
        pin_memory=device.type == "cuda",
    )

    def epoch() -> int:
        torch.manual_seed(0)
        optimizer = make_optimizer(model)
        losses = []
        model.train()
        for (batch,) in loader:
            x = batch.to(device, non_blocking=True)
            loss = model({"data": x})["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.stack(losses).mean().item()
        return len(losses)

    return epoch


def engine_epoch(
    model: torch.nn.Module,
    strategy: Any,
    data: Any,
    batch_size: int,
    device: torch.device,
    compile: bool = False,
) -> EpochFn:
    """One epoch of ``Engine.fit`` (no callbacks, no files), as a user would call it. The
    runners hand it the same tensor the floor reads (already on the device), so that a GPU
    comparison times steps, not a per-fit copy of the dataset to the GPU."""
    config = EngineConfig(
        epochs=1, batch_size=batch_size, device=str(device), output_dir=None, compile=compile
    )
    engine = Engine(strategy, config)

    def epoch() -> int:
        return engine.fit(model, data).steps

    return epoch


def compiled_epoch(
    model: torch.nn.Module,
    strategy: Any,
    data: Any,
    batch_size: int,
    device: torch.device,
    mode: str = "step",
) -> EpochFn:
    """Two epochs of ``Engine.fit`` with ``compile=mode`` (``"step"``: CUDA graphs on a GPU):
    the first compiles (in a process's first fit) and is the warm-up; the second is timed
    between its EPOCH_START and EPOCH_END, so the fit's setup is not in it."""
    config = EngineConfig(
        epochs=2, batch_size=batch_size, device=str(device), output_dir=None, compile=mode
    )
    engine = Engine(strategy, config)
    marks: list[Marks] = []
    engine.on(Event.EPOCH_START, lambda run: marks.append(Marks.now(device)))
    engine.on(Event.EPOCH_END, lambda run: marks.append(Marks.now(device)))

    def epoch() -> Timed:
        marks.clear()
        steps = engine.fit(model, data).steps // 2
        first, second = marks[0].until(marks[1]), marks[2].until(marks[3])
        warmup = {key: first[key] - second[key] for key in first}
        return Timed(steps, second, warmup)

    return epoch


def compiled_runner(
    make_strategy: Callable[[], Any],
    template: torch.nn.Module,
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
    mode: str = "step",
) -> Runner:
    """The engine with ``compile=mode`` on a copy of ``template``."""
    on_device = data.to(device)
    graphs = ", CUDA graphs" if device.type == "cuda" and mode == "step" else ""

    def prepare() -> EpochFn:
        model = fresh(template, device)
        strategy = make_strategy()
        return compiled_epoch(model, strategy, {"data": on_device}, batch_size, device, mode)

    return Runner(f"engine, compile={mode}{graphs}", prepare)


def standard_runners(
    make_model: ModelFactory, data: torch.Tensor, batch_size: int, device: torch.device
) -> list[Runner]:
    """Engine+Standard against the floor (fused and plain Adam) and a DataLoader loop."""
    torch.manual_seed(0)
    template = make_model()
    on_device = data.to(device)

    def floor(make_optimizer: OptimizerFactory) -> Callable[[], EpochFn]:
        def prepare() -> EpochFn:
            return sliced_epoch(fresh(template, device), make_optimizer, on_device, batch_size)

        return prepare

    def loader() -> EpochFn:
        return dataloader_epoch(fresh(template, device), fused_adam, data, batch_size, device)

    def engine() -> EpochFn:
        model = fresh(template, device)
        strategy = Standard(OptimizerSpec("Adam", lr=LR))
        return engine_epoch(model, strategy, {"data": on_device}, batch_size, device)

    return [
        Runner("floor: sliced loop, fused Adam", floor(fused_adam)),
        Runner("engine + Standard (fused Adam)", engine),
        Runner("plain loop: sliced, default Adam", floor(default_adam)),
        Runner("DataLoader loop, fused Adam", loader),
    ]

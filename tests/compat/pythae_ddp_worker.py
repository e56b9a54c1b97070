"""What each rank of a 2-process gloo run does for ``tests/compat/test_pythae_ddp.py``.

Every rank trains pythae's VQVAE with its EMA quantizer on its shard of the data, twice: once
through ``from_pythae`` (its forward gets ``uses_ddp=True``, so the quantizer all-reduces its
codebook statistics, as under pythae's trainer) and once through a plain ``Engine`` whose
forward is just ``model(batch)`` (each rank updates its codebook from its own shard). Each rank
saves its state after both to ``folder/rank<r>.pt``.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.helpers import free_port, set_rank_environment

WORLD_SIZE = 2


def _model() -> torch.nn.Module:
    from pythae.models import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    config = VQVAEConfig(input_dim=(1, 8, 8), latent_dim=2, num_embeddings=16, use_ema=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VQVAE(config)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def scenario(rank: int) -> dict[str, Any]:
    from pythae.trainers import BaseTrainerConfig

    from engine import Engine, EngineConfig, OptimizerSpec
    from strategies import Standard
    from strategies.pythae import from_pythae

    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = BaseTrainerConfig(
        num_epochs=2, per_device_train_batch_size=8, learning_rate=1e-3, no_cuda=True
    )
    model = _model()
    run = from_pythae(model, config, images, overrides={"output_dir": None, "log_every": 1000})
    run.fit()
    plain = _model()
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-3)),
        EngineConfig(epochs=2, batch_size=8, output_dir=None, device="cpu", log_every=1000),
    )
    engine.fit(plain, {"data": images})
    return {"from_pythae": _state(model), "plain": _state(plain), "uses_ddp": run.forward.uses_ddp}


def _entry(rank: int, port: int, folder: str) -> None:
    set_rank_environment(rank, WORLD_SIZE, port)
    out = Path(folder)
    try:
        result = scenario(rank)
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    torch.save(result, out / f"rank{rank}.pt")


def spawn(folder: Path) -> list[dict[str, Any]]:
    """Run the scenario on two gloo ranks; each rank's result, by rank."""
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _entry,
        args=(free_port(), str(folder)),
        nprocs=WORLD_SIZE,
        start_method="spawn",
        join=True,
    )
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]

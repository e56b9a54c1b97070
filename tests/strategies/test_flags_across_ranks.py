"""Under two gloo ranks, an ``update_<role>`` flag that is false on one rank switches that
update off on every rank, and a non-finite loss on one rank (``nonfinite="skip"``) skips the
step on every rank, so the ranks' parameters and optimiser states stay identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from engine.config.specs import OptimizerSpec
from engine.distributed.session import join_process_group, leave_process_group
from strategies import CoupledAdversarial
from tests.helpers import free_port, set_rank_environment
from tests.strategies.toy import CoupledToy, make_ctx

STEPS = 5
OFF_ON_RANK_ONE = {1: "update_discriminator", 2: "update_decoder"}  # step: flag false on rank 1
NAN_ON_RANK_ONE = 3


def _rank(rank: int, port: int, folder: str) -> None:
    set_rank_environment(rank, 2, port)
    world = join_process_group("cpu", 60.0)
    try:
        torch.manual_seed(0)
        model = CoupledToy()
        adam = OptimizerSpec("Adam", lr=0.05)
        strategy = CoupledAdversarial(encoder=adam, decoder=adam, discriminator=adam)
        ctx = make_ctx(nonfinite="skip")
        ctx.world = world
        strategy.setup(model, ctx)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for step in range(STEPS):
            model.flags = {}
            if rank == 1 and step in OFF_ON_RANK_ONE:
                model.flags[OFF_ON_RANK_ONE[step]] = torch.tensor(False)
            if rank == 1 and step == NAN_ON_RANK_ONE:
                model.flags["encoder_loss"] = torch.tensor(float("nan"))
            strategy.train_step(model, {"data": torch.randn(4, 3, generator=data)}, ctx)
        steps = {
            u.role: int(u.optimizer.state[u.params[0]]["step"]) for u in strategy.joint.updates
        }
        result = {
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "steps": steps,
            "skipped": ctx.progress.skipped_steps,
        }
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        leave_process_group()


@pytest.mark.slow
def test_a_flag_false_or_a_non_finite_loss_on_one_rank_acts_on_every_rank(tmp_path: Path) -> None:
    mp.start_processes(
        _rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True
    )
    ranks: list[dict[str, Any]] = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)
    ]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    expected = {"encoder": STEPS - 1, "decoder": STEPS - 2, "discriminator": STEPS - 2}
    assert ranks[0]["steps"] == ranks[1]["steps"] == expected
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1

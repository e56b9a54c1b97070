"""Sequential phases under two gloo ranks, each with its own batches: gradients are averaged per
phase, a flag false or a non-finite phase loss on one rank acts on both, the lazy R1 phase's
collectives line up, and both ranks end with the same parameters and optimiser step counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from engine.config.specs import OptimizerSpec
from engine.distributed.session import join_process_group, leave_process_group
from strategies import Adversarial, r1
from tests.helpers import free_port, set_rank_environment
from tests.strategies.gan_toy import TinyGAN, gan_batches
from tests.strategies.toy import make_ctx

WINDOWS = 6
ACCUMULATE = 2
CRITIC_OFF_ON_RANK_ONE = 1  # window whose first batch says update_discriminator=False on rank 1
NAN_ON_RANK_ONE = 3  # window whose second batch has a NaN generator loss on rank 1


def _rank(rank: int, port: int, folder: str) -> None:
    set_rank_environment(rank, 2, port)
    world = join_process_group("cpu", 60.0)
    try:
        torch.manual_seed(0)
        model = TinyGAN()
        adam = OptimizerSpec("Adam", lr=0.05)
        strategy = Adversarial(
            generator=adam,
            discriminator=adam,
            two_phase=True,
            n_critic=2,
            generator_loss_key="generator_loss",
            regularisers=(r1(1.0),),
            regularise_every=2,
        )
        ctx = make_ctx(nonfinite="skip")
        ctx.world = world
        ctx.forward_fn = _Poison(rank)
        strategy.setup(model, ctx)
        batches = gan_batches(WINDOWS * ACCUMULATE, 3, seed=100 + rank)  # each rank its own
        for index, batch in enumerate(batches):
            ctx.micro_index, ctx.micro_count = index % ACCUMULATE, ACCUMULATE
            place = divmod(index, ACCUMULATE)
            strategy.train_step(model, {**batch, "place": place}, ctx)
        steps = {
            role: max(int(s["step"]) for s in update.optimizer.state.values())
            for role, update in strategy.joint.by_role.items()
        }
        result = {
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "steps": steps,
            "skipped": ctx.progress.skipped_steps,
        }
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        leave_process_group()


class _Poison:
    """On rank 1: the critic's flag false for one window's first batch (its phases still run
    on the other batch), and a NaN generator loss for another window's second batch. The runner
    runs a window's forwards at its last micro-batch, so the batch itself says which it is."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        outputs = model(batch, **kwargs)
        if self.rank != 1:
            return outputs
        window, micro = batch["place"]
        if (window, micro) == (CRITIC_OFF_ON_RANK_ONE, 0) and "discriminator_loss" in outputs:
            outputs["update_discriminator"] = torch.tensor(False)
        if (window, micro) == (NAN_ON_RANK_ONE, 1) and "generator_loss" in outputs:
            outputs["generator_loss"] = outputs["generator_loss"] * float("nan")
        return outputs


@pytest.mark.slow
def test_two_ranks_stay_identical_through_sequential_phases(tmp_path: Path) -> None:
    mp.start_processes(
        _rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True
    )
    ranks: list[dict[str, Any]] = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)
    ]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    # the critic steps in each of the 6 windows (the off flag keeps one batch out, not the
    # window) and its lazy R1 phase in windows 1, 3, 5; the generator in windows 1, 3, 5
    assert ranks[0]["steps"] == ranks[1]["steps"] == {"generator": 3, "discriminator": 9}
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1

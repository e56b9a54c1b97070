"""Exact resume under several processes: each rank resumes its own random streams.

Two gloo ranks train a model with dropout (each rank draws its own masks from its own seed),
stop mid-epoch, resume from the checkpoint rank 0 wrote, and finish: every rank ends bitwise
where an uninterrupted two-rank run ends, random streams included.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from engine.distributed.session import leave_process_group
from tests.engine.checkpoint_cases import equal
from tests.helpers import free_port, set_rank_environment

WORLD_SIZE = 2


def _fit(
    folder: Path,
    name: str,
    max_steps: int | None,
    resume: str | None,
    seed: int,
    batch_size: int = 2,
) -> Any:
    from callbacks import Checkpointing
    from engine import Engine, EngineConfig
    from tests.engine.checkpoint_cases import data, make_case

    model, strategy = make_case("standard", seed)
    config = EngineConfig(
        epochs=2,
        batch_size=batch_size,
        max_steps=max_steps,
        seed=3,
        device="cpu",
        output_dir=folder,
        run_name=name,
        log_every=2,
    )
    checkpointing = Checkpointing(every_n_steps=2, durable=False)
    result = Engine(strategy, config, [checkpointing]).fit(model, data(12), resume=resume)
    return {
        "model": model.state_dict(),
        "strategy": strategy.state_dict(),
        "history": [{k: v for k, v in e.items() if k != "seconds"} for e in result.history],
        "next_random": torch.rand(4),
    }


def _entry(rank: int, port: int, folder: str) -> None:
    set_rank_environment(rank, WORLD_SIZE, port)
    out = Path(folder)
    try:
        reference = _fit(out, "reference", None, None, seed=0)
        _fit(out, "cut", 5, None, seed=0)
        resumed = _fit(out, "cut", None, "last", seed=1)
        from_one_process = _fit(out, "one-process", None, "last", seed=1)
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_process_group()
    results = {"reference": reference, "resumed": resumed, "from_one_process": from_one_process}
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_resume_mid_epoch_exactly_with_their_own_random_streams(
    tmp_path: Path,
) -> None:
    # A checkpoint of one process (global batch 4), which the two ranks below resume as well.
    _fit(tmp_path, "one-process", 3, None, seed=0, batch_size=2 * WORLD_SIZE)
    mp.start_processes(
        _entry,
        args=(free_port(), str(tmp_path)),
        nprocs=WORLD_SIZE,
        start_method="spawn",
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, result in enumerate(results):
        reference, resumed = result["reference"], result["resumed"]
        assert equal(reference["model"], resumed["model"]), rank
        assert equal(reference["strategy"], resumed["strategy"]), rank
        assert reference["history"] == resumed["history"], rank
        assert torch.equal(reference["next_random"], resumed["next_random"]), rank
    # The ranks drew different masks: only their own streams could give these results.
    assert not torch.equal(
        results[0]["resumed"]["next_random"], results[1]["resumed"]["next_random"]
    )
    # A checkpoint of one process holds rank 0's streams only: rank 1 draws its own, not a copy.
    one = [result["from_one_process"] for result in results]
    assert equal(one[0]["model"], one[1]["model"])
    assert not torch.equal(one[0]["next_random"], one[1]["next_random"])

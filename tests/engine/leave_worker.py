"""A rank that imports, of this project, only the process-group session: no strategy, so that
``torch._dynamo`` (which imports ``torch.distributed.nn.functional``, whose default arguments
bind the group) is first imported by the optimiser built after the group was joined, as in a
script that imports only ``engine``. ``test_distributed.py`` spawns it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.distributed.session import join_process_group, leave_process_group
from tests.helpers import gloo_worker_threads, set_rank_environment


def entry(rank: int, port: int, folder: str) -> None:
    set_rank_environment(rank, 2, port)
    imported_before = "torch.distributed.nn.functional" in sys.modules
    join_process_group("cpu", 60.0)
    parameter = torch.nn.Parameter(torch.ones(3))
    torch.optim.Adam([parameter], lr=0.1)  # imports torch._dynamo now, the group existing
    value = torch.ones(3)
    dist.all_reduce(value)
    during = gloo_worker_threads()
    leave_process_group()
    result = {
        "imported_before": imported_before,
        "sum": value.tolist(),
        "gloo_threads": (during, gloo_worker_threads()),
    }
    torch.save(result, Path(folder) / f"rank{rank}.pt")

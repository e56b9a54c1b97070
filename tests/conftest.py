"""Test-session settings: one intra-op thread per process.

The tests use tiny models on a 2-core machine where several processes (test workers, gloo
ranks, CLI subprocesses) compete; torch's default thread pool makes such models 20-100x slower
there, for no gain. Bitwise comparisons in the tests always compare runs within one setting.
"""

from __future__ import annotations

import torch


def pytest_configure() -> None:
    torch.set_num_threads(1)

"""Fixtures the compile tests share (``test_compile.py``, ``test_compile_step.py``,
``test_cuda_graphs.py``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import clear_compilation_metrics, counters
from torch._inductor import config as inductor_config


@pytest.fixture(scope="module")
def inductor() -> None:
    """torch.compile's CPU backend builds C++ with the machine's toolchain: where it cannot
    compile even a one-line function, these tests are skipped with the toolchain's error."""
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++, c++ or clang++) on PATH")
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # the toolchain, not our code: nothing of ours ran
        pytest.skip(f"torch.compile does not work on this machine: {error}")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No compiled code, counters or metrics from earlier tests; eager's random numbers."""
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()

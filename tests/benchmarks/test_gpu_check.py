"""``.ci/gpu-check``, the one prepared run of the checks that need a GPU: without a CUDA device
it stops at once with one ``error:`` line and exit 2, writing nothing but its output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check runs")
def test_without_a_cuda_device_the_gpu_check_stops_with_one_error_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    result = subprocess.run(
        [str(REPO / ".ci" / "gpu-check")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device"), result.stderr
    assert sys.executable in lines[0]
    assert list(out.iterdir()) == []

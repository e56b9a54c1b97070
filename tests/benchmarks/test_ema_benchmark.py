"""benchmarks/ema.py runs in its tiny mode and reports every runner (speed is never asserted)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import ema


@pytest.mark.slow
def test_the_ema_benchmark_reports_each_runner_and_the_update_alone() -> None:
    threads = torch.get_num_threads()
    try:
        report = ema.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    for name in ("no EMA", "EMA(generator)", "EMA(whole model)"):
        assert re.search(rf"^\| {re.escape(name)} \| 32 \| [\d.]+ \|", report, re.M), name
    assert re.search(r"^\| generator \| 139,969 \| [\d.]+ \| [\d.]+ \|$", report, re.M)

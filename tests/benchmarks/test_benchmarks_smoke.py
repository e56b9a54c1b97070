"""Every benchmark runs in its tiny mode and reports what it measured.

These check that the scripts work (a benchmark that crashes when someone finally runs it is
worthless), not how fast anything is: speed is never asserted in a test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from benchmarks import (
    coldstart,
    dataset_size,
    denormals,
    instructions,
    memory,
    overhead,
    per_step,
    python_in_step,
    suite,
)
from benchmarks.harness import Runner, interleave, markdown_table
from benchmarks.peers import available
from benchmarks.workloads import WORKLOADS

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (?P<name>[^|]+) \| (?P<batch>\d+) \| (?P<median>[\d.]+) \|", re.M)


def _rows(text: str) -> dict[str, float]:
    return {m["name"].strip(): float(m["median"]) for m in ROW.finditer(text)}


def test_suite_speed_part_times_every_trainer_of_every_workload(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = tmp_path / "report.md"
    suite.main(["--tiny", "--parts", "speed", "--no-peers", "--output", str(report)])
    text = report.read_text()
    rows = _rows(text)
    for name in WORKLOADS:
        assert f"**{name} (" in text
    for strategy in ("Standard (fused Adam)", "Adversarial", "Coupled", "CoupledAdversarial"):
        assert f"engine + {strategy}" in rows
    assert "floor: sliced loop, fused Adam" in rows
    assert "floor: sliced loop, isolated grads" in rows
    assert all(value > 0 for value in rows.values()), rows


def test_interleave_rotates_the_order_and_keeps_every_repeat() -> None:
    calls: list[str] = []

    def runner(name: str) -> Runner:
        def prepare() -> object:
            def epoch() -> int:
                calls.append(name)
                return 2

            return epoch

        return Runner(name, prepare)  # type: ignore[arg-type]

    timings = interleave([runner("a"), runner("b"), runner("c")], 8, 3, torch.device("cpu"))
    assert calls == list("abcbcacababc")  # the warm-up round is run, not kept
    assert [len(t.ms_per_step) for t in timings] == [3, 3, 3]
    table = markdown_table("t", timings, "a")
    assert "| a | 8 |" in table and "1.000" in table


def test_overhead_script_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    assert overhead.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert {"floor: sliced loop, fused Adam", "engine + Standard (fused Adam)"} <= set(rows)
    assert "engine / floor (same fused Adam):" in out


@pytest.mark.slow
def test_coldstart_scripts_run_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child scripts are valid and train (run here in-process; the benchmark spawns them)."""
    monkeypatch.chdir(tmp_path)  # the engine's default config writes its run folder here
    for source in (coldstart.HAND_WRITTEN, coldstart.ENGINE):
        exec(compile(source, "<coldstart child>", "exec"), {})
    text = coldstart.report({"hand-written": [1.0, 1.2], "engine": [1.1, 1.3]})
    assert "engine - hand-written: +0.100 s" in text


def test_memory_child_prints_its_peak_rss(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["mlp_vae_1x4x4", "engine + Standard (fused Adam)", "64", "cpu", "256"]) == 0
    assert float(capsys.readouterr().out.strip()) > 0


def test_memory_child_names_the_runners_when_one_is_unknown() -> None:
    with pytest.raises(SystemExit, match="unknown runner 'nope'; choose from"):
        memory.main(["mlp_vae_1x4x4", "nope", "64", "cpu", "256"])


def test_dataset_size_child_times_both_data_paths() -> None:
    rows = []
    for path in dataset_size.PATHS:
        seconds, peak = dataset_size.run_child(path, 512, 128)
        assert seconds > 0 and peak > 0
        rows.append((path, 512, seconds, peak))
    assert "map-style Dataset (DataLoader)" in dataset_size.report(rows)


@pytest.mark.slow
@pytest.mark.skipif(not available(), reason="no peer trainer (pythae, Ignite, Lightning) here")
def test_peers_run_on_the_standard_workload(capsys: pytest.CaptureFixture[str]) -> None:
    workload = WORKLOADS["mlp_vae_1x4x4"]
    runners = workload.runners(workload.data(256), 64, torch.device("cpu"), available())
    timings = interleave(runners, 64, 1, torch.device("cpu"), warmup=0)
    names = {t.name.split()[0] for t in timings}
    assert {peer.capitalize() for peer in available()} <= {n.capitalize() for n in names}


def test_instruction_count_child_counts_exactly_one_warm_epoch() -> None:
    """Counting is switched on after a warm-up epoch and off after the next one, for the
    floor and the engine alike (callgrind itself is not run here: minutes per trainer)."""
    for trainer in instructions.TRAINERS:
        switches: list[bool] = []
        instructions.one_run("mlp_vae_1x4x4", trainer, 2, count=switches.append)
        assert switches == [True, False]


def test_instruction_count_refuses_steps_out_of_order(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        instructions.main(["--steps", "120", "20"])
    assert exit_info.value.code == 2
    assert "error: --steps needs 0 < SHORT < LONG, got 120 20" in capsys.readouterr().err


def test_denormals_benchmark_reports_every_epoch_of_both_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert denormals.main(["--tiny"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\| \d", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1"]


def _subnormals_survive() -> bool:
    """Whether this process still computes subnormal floats (a benchmark's ``main`` must not
    switch on the process-wide flush to zero: hypothesis refuses to draw floats then)."""
    return bool((torch.tensor([1e-30]) * 1e-10).item() != 0.0)


def test_python_in_step_reports_every_variant_beside_its_warm_cost() -> None:
    text = python_in_step.main(["--tiny"])
    assert _subnormals_survive()
    rows = [line for line in text.splitlines() if line.startswith("| floor")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["floor", "floor again"] + [f"floor + piece x{n}" for n in python_in_step.CALLS]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[2]) > 0, row
        assert len(cells[1].split(" / ")) == 3, row


def test_per_step_reports_the_engine_and_the_floors_noise_per_workload() -> None:
    text = per_step.main(["--tiny", "--workloads", "mlp_vae_1x4x4", "rae_l2_1x4x4"])
    assert _subnormals_survive()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "_1x4x4" in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "mlp_vae_1x4x4 (Standard)",
        "rae_l2_1x4x4 (Coupled)",
    ]
    for row in rows:
        floor, *differences = (cell.strip() for cell in row.split("|")[2:7])
        assert float(floor) > 0, row
        assert [len(cell.split(" / ")) for cell in differences] == [3, 3, 3, 3], row


def test_the_setup_is_taken_out_of_the_per_step_difference() -> None:
    """An epoch of 5 steps costs setup + 5 x step over the floor; a one-step fit setup + step."""
    setup = 100.0
    over_epoch = {"min": (setup + 5 * 4.0) / 5, "q10": 0.0, "median": (setup + 5 * 2.0) / 5}
    over_fit = {"min": setup + 4.0, "q10": 0.0, "median": setup + 2.0}
    steps = per_step.without_setup(over_epoch, over_fit, 5)
    assert steps == {"min": 4.0, "q10": 0.0, "median": 2.0}


def test_over_floor_is_each_runs_difference_at_each_quantile() -> None:
    times = {"floor": [10.0, 12.0, 14.0], "floor again": [11.0, 12.0, 13.0], "engine": [20.0] * 3}
    over = per_step.over_floor(times)
    assert over["engine"] == {"min": 10.0, "q10": 10.0, "median": 8.0}
    assert over["floor again"] == {"min": 1.0, "q10": 1.0, "median": 0.0}

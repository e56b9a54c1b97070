"""Saves are atomic and (by default) durable: what a crash or a power cut can leave behind.

Durable: every file of a checkpoint, its folder, and the folder it is renamed into are fsynced,
the files before the rename that makes them visible and the folder after it; exports too.
The file system calls are observed (``os.fsync``, ``os.rename``, ``os.replace``, wrapped in
this test only); fsynced files are told apart by inode, which a rename keeps.

Atomic: a save interrupted at any of its file operations (each one made to fail in turn) leaves
every visible checkpoint complete and ``resume="last"`` finding the previous checkpoint or the
new one; a file whose write fails midway leaves the previous file as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from callbacks import Checkpointing
from engine import Engine, EngineConfig, OptimizerSpec
from engine.checkpoint.format import (
    MARKER,
    STAGING_PREFIX,
    latest_checkpoint,
    load_checkpoint,
    save_torch_file,
    verify_checkpoint,
    write_atomically,
    write_checkpoint,
)
from strategies import Standard
from tests.engine.checkpoint_cases import DropoutRegressor, data, equal

EXPORTS = ("model_final.pt", "model_best.pt", "model_config.json")


class FileSystemLog:
    """Wraps ``os.fsync``, ``os.rename`` and ``os.replace``: the inodes fsynced, and for each
    rename whether what it made visible had been fsynced before it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced: set[tuple[int, int]] = set()
        self.events: list[tuple[str, tuple[int, int]]] = []
        self.unsynced_at_rename: list[str] = []
        fsync, rename, replace = os.fsync, os.rename, os.replace

        def logged_fsync(fd: int) -> None:
            stat = os.fstat(fd)
            fsync(fd)
            self.synced.add((stat.st_dev, stat.st_ino))
            self.events.append(("fsync", (stat.st_dev, stat.st_ino)))

        def logged_rename(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            self._before_rename(Path(source), Path(target))
            rename(source, target, *args, **kwargs)
            self.events.append(("rename into", _inode(Path(target).parent)))

        def logged_replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            self._before_rename(Path(source), Path(target))
            replace(source, target, *args, **kwargs)
            self.events.append(("rename into", _inode(Path(target).parent)))

        monkeypatch.setattr(os, "fsync", logged_fsync)
        monkeypatch.setattr(os, "rename", logged_rename)
        monkeypatch.setattr(os, "replace", logged_replace)

    def _before_rename(self, source: Path, target: Path) -> None:
        """A rename that makes something visible (out of a staging folder, or a file into a
        visible folder) must come after the fsync of all it installs."""
        if target.parent.name.startswith(STAGING_PREFIX) or target.name.startswith("."):
            return  # inside a staging folder, or moved aside: nothing becomes visible
        paths = [source, *source.rglob("*")] if source.is_dir() else [source]
        for path in paths:
            if _inode(path) not in self.synced:
                self.unsynced_at_rename.append(f"{path} (renamed to {target})")

    def folders_not_synced_after_a_rename_into_them(self) -> list[tuple[int, int]]:
        pending: set[tuple[int, int]] = set()
        for kind, inode in self.events:
            if kind == "rename into":
                pending.add(inode)
            else:
                pending.discard(inode)
        return sorted(pending)


def _inode(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _fit(tmp_path: Path, durable: bool) -> Path:
    """A run that saves every 2 steps and exports its weights and its model's config."""
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        EngineConfig(epochs=2, batch_size=4, device="cpu", output_dir=tmp_path, run_name="run"),
        [Checkpointing(every_n_steps=2, best_k=1, durable=durable, background=False)],
    )
    run_dir = engine.fit(DropoutRegressor(), data(10)).run_dir
    assert run_dir is not None
    return run_dir


def _saved_paths(run_dir: Path) -> list[Path]:
    """Every checkpoint file and folder, the checkpoints folder, and the exports."""
    checkpoints = run_dir / "checkpoints"
    paths = [checkpoints, *(run_dir / name for name in EXPORTS)]
    for folder in checkpoints.iterdir():
        paths += [folder, *folder.iterdir()]
    return paths


def test_a_durable_save_fsyncs_each_file_and_folder_before_it_becomes_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FileSystemLog(monkeypatch)
    run_dir = _fit(tmp_path, durable=True)
    assert log.unsynced_at_rename == []
    unsynced = [path for path in _saved_paths(run_dir) if _inode(path) not in log.synced]
    assert unsynced == [], f"never fsynced: {unsynced}"
    assert log.folders_not_synced_after_a_rename_into_them() == []


def test_a_save_that_is_not_durable_fsyncs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(So that the test above can tell a durable save from one that is not.)"""
    log = FileSystemLog(monkeypatch)
    run_dir = _fit(tmp_path, durable=False)
    assert (run_dir / "checkpoints" / "last" / MARKER).is_file()
    assert [path for path in _saved_paths(run_dir) if _inode(path) in log.synced] == []


def test_a_durable_file_write_fsyncs_the_file_before_its_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FileSystemLog(monkeypatch)
    target = tmp_path / "weights.pt"
    save_torch_file(target, {"w": torch.ones(2)})
    assert log.unsynced_at_rename == []
    assert _inode(target) in log.synced
    assert log.folders_not_synced_after_a_rename_into_them() == []


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "model_final.pt"
    target.write_bytes(b"previous content")

    def half_then_crash(path: Path) -> None:
        path.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_crash)
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]


class Crash(Exception):
    """Stands for the process dying at one file operation."""


def _crashing_at(monkeypatch: pytest.MonkeyPatch, crash_at: int | None) -> Callable[[], int]:
    """Make the ``crash_at``-th file operation of a save (fsync, rename, replace, link, mkdir,
    a file's write) raise ``Crash``; returns a function giving the operations counted."""
    count = [0]
    originals = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "link")}
    write_bytes = Path.write_bytes
    save = torch.save

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            if count[0] == crash_at:
                raise Crash(f"operation {count[0]}")
            count[0] += 1
            return original(*args, **kwargs)

        return operation

    for name, original in originals.items():
        monkeypatch.setattr(os, name, counted(original))
    monkeypatch.setattr(Path, "write_bytes", counted(write_bytes))
    monkeypatch.setattr(torch, "save", counted(save))
    return lambda: count[0]


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def _visible(folder: Path) -> Iterator[Path]:
    return (entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _operations_of_a_save(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as patch:
        count = _crashing_at(patch, None)
        write_checkpoint(tmp, ["last", "step-2"], _state(2.0), {}, {"saved_at_ns": 2})
        return count()


@pytest.mark.parametrize("earlier", [["last"], ["last", "step-1"]], ids=["last", "two-names"])
def test_a_save_interrupted_at_any_file_operation_leaves_a_loadable_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, earlier: list[str]
) -> None:
    """Every file operation of a save is made to fail in turn (a save that installs ``last``
    and ``step-2`` over an earlier one). After each: whatever is visible is complete, and
    ``resume="last"`` finds the earlier checkpoint or the new one (hidden ones included: a crash
    between the renames leaves the only copies there); the next save clears the leftovers."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        total = _operations_of_a_save(tmp_path_factory.mktemp("count") / "checkpoints", monkeypatch)
    assert total > 10
    for crash_at in range(total):
        run = tmp_path_factory.mktemp("run")
        checkpoints = run / "checkpoints"
        write_checkpoint(checkpoints, earlier, _state(1.0), {}, {"saved_at_ns": 1})
        with pytest.MonkeyPatch.context() as monkeypatch:
            _crashing_at(monkeypatch, crash_at)
            with pytest.raises(Crash):
                write_checkpoint(
                    checkpoints, ["last", "step-2"], _state(2.0), {}, {"saved_at_ns": 2}
                )
        for folder in _visible(checkpoints):  # whatever is visible is complete
            verify_checkpoint(folder)
        found = latest_checkpoint(run)
        assert found is not None, f"no loadable checkpoint after a crash at operation {crash_at}"
        restored = load_checkpoint(found).model_state
        assert equal(restored, _state(1.0)) or equal(restored, _state(2.0)), crash_at
        write_checkpoint(checkpoints, ["last"], _state(3.0), {}, {"saved_at_ns": 3})
        newest = latest_checkpoint(run)
        assert newest is not None and equal(load_checkpoint(newest).model_state, _state(3.0))
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], crash_at

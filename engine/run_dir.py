"""The run folder (``output_dir/<run-name>/``) and the ``train.log`` sink that writes into it
(one line per record).

Two runs never share a folder: the folder is created with ``exist_ok=False``, and a name that is
taken gets a ``-1``, ``-2``... suffix.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger


def create_run_dir(output_dir: Path, run_name: str | None) -> Path:
    """A new, empty folder for this run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    base = run_name or time.strftime("run-%Y%m%d-%H%M%S")
    for suffix in range(10_000):
        candidate = output_dir / (base if suffix == 0 else f"{base}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run folder named {base!r}-N under {output_dir}")


@contextlib.contextmanager
def log_file(run_dir: Path | None) -> Iterator[None]:
    """Copy this run's log records into ``run_dir/train.log`` while the block runs: those of
    the run's bound logger (``RunState.log``) and every other record logged in the block's
    thread and context (``logger.contextualize``: the engine's modules log with the plain
    ``logger``, e.g. each role's DDP at its first step), but not another run's."""
    if run_dir is None:
        yield
        return
    run_id = str(run_dir)
    sink = logger.add(
        run_dir / "train.log",
        level="INFO",
        filter=lambda record: record["extra"].get("run") == run_id,
        format=_one_line,
    )
    try:
        with logger.contextualize(run=run_id):
            yield
    finally:
        logger.remove(sink)


def _one_line(record: Any) -> str:
    """The format of a ``train.log`` record: one line each, whatever the message holds (line
    breaks and an exception's traceback are folded into it), so the file reads and greps as one
    record per line."""
    text = record["message"]
    if record["exception"] is not None:
        kind, value, _ = record["exception"]
        text += f" [{getattr(kind, '__name__', kind)}: {value}]"
    record["extra"]["one_line"] = " | ".join(part.strip() for part in text.splitlines())
    return "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[one_line]}\n"

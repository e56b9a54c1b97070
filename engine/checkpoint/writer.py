"""Writing checkpoints off the training thread: a snapshot is taken at the save point, the files
are written by one background thread while training goes on.

Training waits only for the snapshot (a host copy of the state; tensors change in place at the
next step) and, if the previous write is still running when the next save comes, for that write:
at most one write is in flight, in order. An error of a write is raised at the next ``submit``
or ``wait``, so it ends the run instead of being lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def snapshot(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are copied to the CPU, detached from
    anything training will change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple):
        return tuple(snapshot(item) for item in value)
    return value


class BackgroundWriter:
    """One worker thread running write jobs in order, at most one at a time."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        """Wait for the previous job (raising its error), then start ``job``."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(job)

    def wait(self) -> None:
        """Block until the job in flight is done; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the job in flight, then stop the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

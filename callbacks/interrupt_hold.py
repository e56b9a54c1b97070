"""Holding Ctrl-C (SIGINT) until the running training step ends, so that the checkpoint saved on
the interrupt is at a consistent point instead of being refused.

Installed by ``Checkpointing`` for the length of a fit only (never at import), on the main
thread only, and only where SIGINT still has Python's default handler (a handler of the user's
own is left alone). Outside a step, Ctrl-C interrupts at once as usual; inside one, the first
Ctrl-C is held and raised as ``KeyboardInterrupt`` when the step has completed; a second Ctrl-C
during the same step interrupts at once (that crash is then not saved).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import attrs


@attrs.define(eq=False)
class InterruptHold:
    """SIGINT handling for one fit: ``install``, ``enter_step``/``leave_step``, ``uninstall``."""

    _previous: Any = None
    _installed: bool = False
    _in_step: bool = False
    _held: bool = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._on_interrupt)
        self._installed = True
        self._in_step = self._held = False

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        self._in_step = self._held = False

    def enter_step(self) -> None:
        self._in_step = True

    def leave_step(self) -> None:
        """The step is complete: raise the interrupt held during it, if any."""
        self._in_step = False
        if self._held:
            self._held = False
            raise KeyboardInterrupt("Ctrl-C held until the end of the training step")

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._in_step and not self._held:
            self._held = True
            return
        raise KeyboardInterrupt

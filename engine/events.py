"""The events of a run, where each fires, and the bus that dispatches them.

The loop, with the place where each event fires (``engine/loop.py`` is this, in code)::

    FIT_START
    for epoch in epochs:
        EPOCH_START
        for batch in train batches:
            BATCH_START
            metrics = strategy.train_step(model, batch, ctx)   # forward, backward, optimiser steps
            BATCH_END                                          # run.step_metrics: device tensors
        if eval is due:
            EVAL_START
            for batch in eval batches: strategy.eval_step(model, batch, ctx)   # no grad
            EVAL_END                                           # run.eval_metrics: floats
        strategy.end_epoch(metrics)                            # per-epoch schedulers, plateau
        EPOCH_END                                              # run.epoch_metrics: floats
    FIT_END
    EXCEPTION  (on any error or KeyboardInterrupt, before it propagates; FIT_END does not fire)

Which events fire when a run ends early:

=====================  ===========================================================
how the run ends       what fires
=====================  ===========================================================
normally               ... EPOCH_END, FIT_END
``engine.stop()`` in   the current batch finishes, BATCH_END fires, then FIT_END;
a batch handler        the partial epoch gets no eval and no EPOCH_END
``stop()`` at          EPOCH_END finishes (all its handlers), then FIT_END
EPOCH_END
``max_steps`` reached  as ``stop()`` in a batch handler; if the last batch of an
                       epoch is the last step, the epoch completes normally
an exception           EXCEPTION, then the exception propagates; no FIT_END
KeyboardInterrupt      EXCEPTION (``run.exception`` is the interrupt), propagates
=====================  ===========================================================

Under several processes a ``stop()`` takes effect at the next log interval (a batch whose step
is a multiple of ``log_every``) or epoch end, on every rank at once, whichever rank asked.

Ordering contract: the strategy acts first (it is called by the loop, not through the bus); then
handlers run by descending ``priority`` (ties in subscription order). User callbacks default to
priority 0; ``Checkpointing`` runs at ``CHECKPOINT_PRIORITY`` and ``EarlyStopping`` at
``EARLY_STOPPING_PRIORITY``, after every user callback, so a checkpoint sees the final metrics of
an epoch and early stopping decides last.

Handlers take one argument, the ``RunState``. A callback is any object with ``on_<event>``
methods (``on_fit_start``, ``on_batch_end``...) and an optional ``priority`` attribute; a plain
function subscribes with ``Subscription(Event.BATCH_END, fn, every=10)`` or ``engine.on(...)``.
``every=n`` and ``once=n`` count the event's occurrences and are resolved when the handler is
subscribed, so dispatch only ever calls handlers that were subscribed to that event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from engine.config.validators import instance_of, is_callable, optional, positive_int
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.state import RunState

Handler = Callable[["RunState"], Any]

CHECKPOINT_PRIORITY = -100
EARLY_STOPPING_PRIORITY = -200


class Event(enum.Enum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"
    EXCEPTION = "exception"

    # Members are singletons compared by identity, so identity is a valid hash; it spares the
    # bus a Python-level ``Enum.__hash__`` call on each dispatch.
    __hash__ = object.__hash__

    @property
    def method_name(self) -> str:
        """The method a callback object defines to receive this event."""
        return f"on_{self.value}"


@attrs.frozen
class Subscription:
    """A plain function subscribed to one event, with its priority and filters."""

    event: Event = attrs.field(validator=instance_of(Event))
    handler: Handler = attrs.field(validator=is_callable)
    priority: int = 0
    every: int | None = attrs.field(default=None, validator=optional(positive_int))
    once: int | None = attrs.field(default=None, validator=optional(positive_int))

    def __attrs_post_init__(self) -> None:
        if self.every is not None and self.once is not None:
            raise ConfigError(
                f"give every= or once=, not both (every={self.every}, once={self.once})"
            )


def _filtered(handler: Handler, every: int | None, once: int | None) -> Handler:
    """Wrap ``handler`` so it runs on every n-th occurrence, or once on the n-th."""
    if every is None and once is None:
        return handler
    seen = 0

    def run_filtered(run: RunState) -> Any:
        nonlocal seen
        seen += 1
        if (every is not None and seen % every == 0) or seen == once:
            return handler(run)
        return None

    return run_filtered


@attrs.define(eq=False)
class Handlers:
    """The handlers of one event, in dispatch order. The bus replaces ``handlers`` (a tuple) at
    each subscription and never the holder, so a loop may fetch the holder once and test
    ``holder.handlers`` per batch: with no subscriber a batch costs no call at all."""

    handlers: tuple[Handler, ...] = ()


class EventBus:
    """Handlers per event, sorted once at subscription; ``fire`` just calls them in order."""

    def __init__(self) -> None:
        self._entries: dict[Event, list[tuple[int, int, Handler]]] = {e: [] for e in Event}
        self._dispatch: dict[Event, Handlers] = {e: Handlers() for e in Event}
        self._count = 0

    def subscribe(self, subscription: Subscription) -> None:
        entries = self._entries[subscription.event]
        handler = _filtered(subscription.handler, subscription.every, subscription.once)
        entries.append((-subscription.priority, self._count, handler))
        self._count += 1
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        self._dispatch[subscription.event].handlers = tuple(entry[2] for entry in entries)

    def add(self, callback: Any) -> None:
        """Subscribe a ``Subscription`` or every ``on_<event>`` method of a callback object."""
        if isinstance(callback, Subscription):
            self.subscribe(callback)
            return
        priority = getattr(callback, "priority", 0)
        methods = [(event, getattr(callback, event.method_name, None)) for event in Event]
        found = [(event, method) for event, method in methods if callable(method)]
        if not found:
            raise ConfigError(
                f"callback {callback!r} has no on_<event> method and is not a Subscription; "
                f"expected one of {[e.method_name for e in Event]}"
            )
        for event, method in found:
            self.subscribe(Subscription(event, method, priority=priority))

    def add_all(self, callbacks: Iterable[Any]) -> None:
        for callback in callbacks:
            self.add(callback)

    def handlers(self, event: Event) -> tuple[Handler, ...]:
        return self._dispatch[event].handlers

    def holder(self, event: Event) -> Handlers:
        """The live holder of ``event``'s handlers (see ``Handlers``), for the per-batch loop."""
        return self._dispatch[event]

    def fire(self, event: Event, run: RunState) -> None:
        for handler in self._dispatch[event].handlers:
            handler(run)

"""An instrument that counts host reads of tensor data at their source, on any device.

A host-device synchronisation happens wherever the host needs a value computed on the device.
``counting_host_reads()`` records each one, with the first place outside torch that caused it:

* A ``TorchDispatchMode`` sees every aten op that runs, whoever calls it (our packages, the
  model, torch's own optimisers, autograd's backward), on every device. It records the ops that
  hand device data to the host: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``float()``,
  ``int()``, ``torch.is_nonzero``, a tensor in an ``if``), ``is_nonzero``, ``equal``, the ops
  whose output size depends on the data (``nonzero``, ``masked_select``, ``unique``..., and
  indexing with a boolean mask), and every copy (``_to_copy``, ``copy_``) from another device
  to the CPU.
* On the CPU a move to the host is a no-op that reaches no kernel: ``.cpu()``, ``.tolist()``,
  ``.numpy()`` and ``.to("cpu")`` of a CPU tensor dispatch nothing (on a GPU they would be the
  ``_to_copy`` above). A ``TorchFunctionMode`` sees those Python calls, for tensors already on
  the CPU (so that nothing is counted twice on a GPU). ``.to()`` is counted only when the CPU is
  its destination and it is called from outside torch: torch's own functions move tensors to
  the devices of other tensors (``clip_grad_norm_`` sends its coefficient to the gradients'
  device), which on a GPU is never the host.

So on the CPU every read that would synchronise a GPU is seen, and on a GPU every op that does.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN = torch.ops.aten
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())

# Ops that read device data on the host (a scalar, or an output size that depends on values).
_READ_OP_NAMES = (
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
)
READ_OPS = frozenset(getattr(_ATEN, name) for name in _READ_OP_NAMES if hasattr(_ATEN, name))
_INDEX_OPS = frozenset({_ATEN.index, _ATEN.index_put, _ATEN.index_put_})
_COPY_OPS = frozenset({_ATEN._to_copy, _ATEN.copy_})
# Python-level moves to the host that are no-ops (no kernel) on the CPU.
_HOST_CALLS = ("cpu", "tolist", "numpy")


def _source_location() -> str:
    """``file:line`` of the innermost frame outside torch and this instrument."""
    frame = sys._getframe(1)
    while frame is not None:
        name = str(Path(frame.f_code.co_filename).resolve())
        if not name.startswith(_TORCH_DIR) and name != _THIS_FILE:
            return f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<torch>"


def _is_boolean_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
        for index in (indices or ())
    )


def _copies_to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A ``_to_copy`` to the CPU or a ``copy_`` into a CPU tensor, from another device."""
    if func.overloadpacket is _ATEN._to_copy:
        source, target = args[0], kwargs.get("device")
        return (
            target is not None
            and torch.device(target).type == "cpu"
            and (source.device.type != "cpu")
        )
    destination, source = args[0], args[1]
    return (
        isinstance(source, torch.Tensor)
        and destination.device.type == "cpu"
        and source.device.type != "cpu"
    )


class HostReads:
    """What was read on the host while ``active``: ``"what at file:line"`` entries."""

    def __init__(self) -> None:
        self.active = True
        self.reads: list[str] = []

    def record(self, what: str) -> None:
        self.reads.append(f"{what} at {_source_location()}")


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.host_reads = reads

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.host_reads.active:
            packet = func.overloadpacket
            if (
                packet in READ_OPS
                or (packet in _INDEX_OPS and _is_boolean_index(args))
                or (packet in _COPY_OPS and _copies_to_host(func, args, kwargs))
            ):
                self.host_reads.record(f"aten.{packet.__name__}")
        return func(*args, **kwargs)


class _PythonLevel(TorchFunctionMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.host_reads = reads

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.host_reads.active and args and isinstance(args[0], torch.Tensor):
            name = getattr(func, "__name__", "")
            tensor = args[0]
            if tensor.device.type == "cpu" and (
                name in _HOST_CALLS
                or (name == "to" and self._to_host_from_outside_torch(args, kwargs))
            ):
                self.host_reads.record(f"Tensor.{name}")
        return func(*args, **kwargs)

    @staticmethod
    def _to_host_from_outside_torch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        caller = sys._getframe(2).f_code.co_filename
        if str(Path(caller).resolve()).startswith(_TORCH_DIR):
            return False
        try:
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        except (TypeError, RuntimeError):
            return False
        return device is not None and device.type == "cpu"


@contextlib.contextmanager
def counting_host_reads() -> Iterator[HostReads]:
    """Record every host read of tensor data inside the block (while ``reads.active``)."""
    reads = HostReads()
    with _PythonLevel(reads), _DispatchLevel(reads):
        yield reads

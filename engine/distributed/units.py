"""FSDP2's units of a model, and putting them back on their shards.

``fully_shard`` turns a module into an FSDP unit: before its forward it all-gathers its
parameters and registers the gathered (unsharded) copies on the module in place of the
``DTensor`` shards; after it, or after the backward, it frees them and registers the shards
again. With ``fsdp_reshard_after_forward=False`` a unit keeps its gathered copies after the
forward, for the backward that usually follows. Where no backward follows (an evaluation, the
pre-flight forward, a picture or a quality measure of a callback), the unit stays gathered:
``model.parameters()`` then lists the gathered copies, not the shards the optimisers step and
the checkpoints save (a sharded save can not match them: ``KeyError``), code that writes into
the parameters writes into copies the next forward may keep using, and the model holds a full
copy of those units in memory. ``reshard(fsdp_units(model))`` is the remedy: a local operation
(no communication), a no-op for a unit already sharded and for a model that is not sharded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 sharded in ``model`` (none until ``torch.distributed.fsdp`` is
    imported: a run that does not shard never imports it, about a second)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return []
    return [module for module in model.modules() if isinstance(module, fsdp.FSDPModule)]


def reshard(units: Sequence[nn.Module]) -> None:
    """Drop every gathered copy of the units' parameters and register their shards again (a
    local op): the next forward gathers what the shards hold then. Called wherever a forward
    is not followed by a backward (see the module docstring)."""
    for unit in units:
        unit.reshard()  # type: ignore[operator]


def reshard_model(model: nn.Module) -> None:
    """``reshard(fsdp_units(model))``: every unit of ``model`` back on its shards."""
    reshard(fsdp_units(model))

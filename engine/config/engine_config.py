"""What the user configures for a run: one frozen, validated attrs class.

Every invalid value fails at construction with a ``ConfigError`` naming the field and the value,
so a bad run never starts. Optimiser and scheduler choices live with the strategy (see
``engine.config.specs``), not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from engine.config.validators import (
    device_name,
    finite_positive_number,
    is_bool,
    list_as_tuple,
    mesh_shape,
    min_or_max,
    names_tuple,
    non_empty_str,
    non_negative_int,
    one_of,
    optional,
    plain_folder_name,
    positive_int,
    positive_number,
    seed_value,
)
from engine.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
NonFinitePolicy = Literal["raise", "skip"]
MonitorMode = Literal["min", "max"]
Parallel = Literal["ddp", "fsdp"]


def _optional_path(value: Any) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise ConfigError(f"output_dir must be a path or None, got {value!r}")


@attrs.frozen(kw_only=True)
class EngineConfig:
    """How the loop runs: length, batching, device, precision, logging and output.

    ``max_steps`` counts batches (calls to ``train_step``) and ends the run early when reached.
    ``accumulate_steps`` micro-batches make one optimiser step. ``output_dir=None`` writes no
    files at all (no run folder, no ``train.log``).
    ``distributed_timeout_s`` bounds how long a rank waits for the others (joining the process
    group, any collective) before it stops with an error.
    ``compile``: ``True`` or ``"model"`` compiles the model with ``torch.compile``; ``"step"``
    compiles the strategy's whole training step, forwards and isolated backwards in one graph
    (CUDA graphs on a GPU); see ``engine/hardware/compiling.py``.
    ``eval_with_grad`` runs evaluation and prediction with gradients on (still in eval mode, no
    optimiser touched, the RNG forked): for models whose loss calls ``torch.autograd.grad``
    (gradient penalties, HMC steps in HVAE/RHVAE); it costs the memory of a backward graph.
    ``parallel`` says how several processes (``torchrun``) share the work: ``"ddp"`` keeps the
    whole model on every rank and averages gradients with one DDP per role; ``"fsdp"`` shards
    parameters, gradients and optimiser state across the ranks (FSDP2,
    ``engine/distributed/sharding.py``; checkpoints become sharded, ``precision="bf16"`` becomes
    bf16 parameters with fp32 reduction). Under ``"fsdp"``: ``fsdp_blocks`` names the module
    classes sharded as units of their own (a VAE's ``ResBlock``; empty: only the role
    submodules ``encoder``/``decoder``/``discriminator`` that exist, and the root);
    ``fsdp_mesh`` is None (one dimension over every rank) or ``(replicate, shard)`` (HSDP, e.g.
    ``(nodes, gpus_per_node)``); ``fsdp_reshard_after_forward`` frees the gathered parameters
    after each unit's forward (less memory, one more all-gather in the backward);
    ``fsdp_forward_methods`` names model methods run outside ``forward`` (``"sample"``,
    ``"decoder.logits"``) so that they gather their parameters.
    """

    epochs: int = attrs.field(default=1, validator=positive_int)
    max_steps: int | None = attrs.field(default=None, validator=optional(positive_int))
    batch_size: int = attrs.field(default=64, validator=positive_int)
    eval_batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    shuffle: bool = attrs.field(default=True, validator=is_bool)
    drop_last: bool = attrs.field(default=False, validator=is_bool)
    seed: int = attrs.field(default=0, validator=seed_value)
    device: str = attrs.field(default="auto", validator=device_name)
    precision: Precision = attrs.field(default="fp32", validator=one_of("fp32", "bf16", "fp16"))
    grad_clip_norm: float | None = attrs.field(default=None, validator=optional(positive_number))
    accumulate_steps: int = attrs.field(default=1, validator=positive_int)
    eval_every: int = attrs.field(default=1, validator=positive_int)
    log_every: int = attrs.field(default=50, validator=positive_int)
    nonfinite: NonFinitePolicy = attrs.field(default="raise", validator=one_of("raise", "skip"))
    monitor: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    monitor_mode: MonitorMode = attrs.field(default="min", validator=min_or_max)
    num_workers: int = attrs.field(default=0, validator=non_negative_int)
    data_on_device: bool = attrs.field(default=True, validator=is_bool)
    compile: bool | Literal["model", "step"] = attrs.field(
        default=False, validator=one_of(False, True, "model", "step")
    )
    output_dir: Path | None = attrs.field(default=Path("runs"), converter=_optional_path)
    run_name: str | None = attrs.field(default=None, validator=optional(plain_folder_name))
    distributed_timeout_s: float = attrs.field(default=600.0, validator=finite_positive_number)
    eval_with_grad: bool = attrs.field(default=False, validator=is_bool)
    parallel: Parallel = attrs.field(default="ddp", validator=one_of("ddp", "fsdp"))
    fsdp_blocks: tuple[str, ...] = attrs.field(
        default=(), converter=list_as_tuple, validator=names_tuple
    )
    fsdp_mesh: tuple[int, ...] | None = attrs.field(
        default=None, converter=list_as_tuple, validator=mesh_shape
    )
    fsdp_reshard_after_forward: bool = attrs.field(default=True, validator=is_bool)
    fsdp_forward_methods: tuple[str, ...] = attrs.field(
        default=(), converter=list_as_tuple, validator=names_tuple
    )

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (paths as strings), for ``config.toml`` and checkpoints."""
        values = attrs.asdict(self)
        values["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineConfig:
        """Build from plain values; an unknown key is an error naming it and the known ones."""
        known = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

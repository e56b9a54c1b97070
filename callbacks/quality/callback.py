"""FID and KID of a generator (or an autoencoder's reconstructions) at the end of epochs.

``QualityMetrics(reference=..., extractor="random_conv", num_samples=1000)`` adds
``eval/fid``, ``eval/kid`` and ``eval/kid_std`` to ``run.epoch_metrics`` (so to the history, the
console, the trackers) at every ``every``-th EPOCH_END. It runs at ``QUALITY_PRIORITY``, before
every default-priority callback and so before ``Checkpointing`` and ``EarlyStopping``: give them
``monitor="eval/fid"`` (mode ``"min"``) to keep the best checkpoint or stop on it. When the run's
own monitor (``engine.monitor``) is one of these metrics, ``run.best_value``/``best_epoch`` are
updated here too (the engine ranks epochs before EPOCH_END, without them).

What is measured:

* the reference: the images of ``reference`` (a tensor (N, C, H, W), a dict with a ``"data"``
  tensor, or an import path ``"package.module:function"`` called with ``reference_args``),
  streamed once through the extractor, on first use;
* ``source="samples"``: ``num_samples`` images from the model's sampler (``method``, called
  with noise drawn from ``seed``, the same at every evaluation, so epochs are compared on the
  same latents); ``source="reconstructions"``: the model's ``recon_x`` of the first
  ``num_samples`` reference images (rFID of an autoencoder).

Memory is bounded and flat over evaluations: per side a ``FeatureStatistics`` (D + D^2 float64
sums) and, for KID, a ``FeatureReservoir`` of at most ``kid_reservoir`` features (a uniform
sample; KID is estimated from it over ``kid_subsets`` subsets of ``kid_subset_size``); the
buffers are allocated once and reused. Under several processes each rank generates and extracts
its share of the batches (batch ``b`` on rank ``b % world_size``), the sums are added over the
ranks and the reservoirs concatenated, so every rank logs the same values. The model runs in
eval mode, without gradients, inside a forked RNG, with the EMA weights when the run has an
``EMA`` callback (``ema=None``; ``True`` requires one, ``False`` measures the raw weights).

Under FSDP2 (``parallel="fsdp"``) every forward of the sharded model is collective (each FSDP
unit all-gathers its parameters from every rank), so every rank runs as many model calls as the
rank with the most batches, in lockstep: a rank whose share is shorter (the batch count does not
divide by the world size) calls the model once more per missing batch on the last batch's input
and measures nothing of it. No communication decides this: every rank knows the batch count.
The statistics stay those of each batch exactly once, so FID and KID equal one process's on the
same weights. A ``method`` run outside ``forward`` (``sample``) must be registered with FSDP
(``EngineConfig.fsdp_forward_methods``) or be an FSDP unit: FIT_START refuses any other, naming
it (``check_sharded_method``). After measuring, the model's units are back on their shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from callbacks.generation import (
    check_ema_choice,
    check_noise_shape,
    check_sharded_method,
    check_value_range,
    ema_weights,
    find_emas,
    noise_shape_of,
    quiet_eval,
    resolve_method,
)
from callbacks.quality.extractors import Extractor, build_extractor, check_features
from callbacks.quality.statistics import (
    FeatureReservoir,
    FeatureStatistics,
    fid_from_statistics,
    kernel_inception_distance,
)
from engine.config.validators import non_empty_str, one_of, positive_int
from engine.distributed.collectives import World
from engine.distributed.sharding import is_sharded_model
from engine.errors import ConfigError, ModelOutputError
from engine.state import RunState

# Before the default-priority callbacks (console, history, trackers) and so before
# Checkpointing and EarlyStopping, which read the metrics it adds; after the EMA (90).
QUALITY_PRIORITY = 80
METRICS = ("fid", "kid", "kid_std")


def load_reference(reference: Any, args: Mapping[str, Any]) -> torch.Tensor:
    """The reference images as one (N, C, H, W) float CPU tensor."""
    if isinstance(reference, str):
        if ":" not in reference:
            raise ConfigError(
                f"reference {reference!r} must be an import path 'package.module:function'"
            )
        from engine.config.file import import_object

        reference = import_object("reference", reference)(**dict(args))
    elif args:
        raise ConfigError(f"reference_args {sorted(args)} are for a reference given by path")
    if isinstance(reference, Mapping):
        reference = reference.get("data")
    if not isinstance(reference, torch.Tensor):
        raise ConfigError(
            "reference must be images: a tensor (N, C, H, W), a dict with a 'data' tensor, or an "
            f"import path to a function returning one; got {type(reference).__name__}"
        )
    if reference.ndim == 3:
        reference = reference.unsqueeze(1)
    if reference.ndim != 4 or len(reference) < 2:
        raise ConfigError(
            f"reference images must be (N, C, H, W) with N >= 2, got {tuple(reference.shape)}"
        )
    return reference.detach().float().cpu()


@attrs.define(eq=False)
class QualityMetrics:
    """See the module docstring. ``extractor``: an ``Extractor`` (callable (N, C, H, W) ->
    (N, D)), a built-in name (``"random_conv"``, ``"inception_v3"``) or an import path, built
    with ``extractor_args`` (e.g. ``{weights_path = "..."}`` for InceptionV3)."""

    reference: Any = None
    reference_args: Mapping[str, Any] = attrs.field(factory=dict)
    extractor: Any = "random_conv"
    extractor_args: Mapping[str, Any] = attrs.field(factory=dict)
    source: str = attrs.field(default="samples", validator=one_of("samples", "reconstructions"))
    method: str = attrs.field(default="sample", validator=non_empty_str)
    noise_shape: tuple[int, ...] | None = attrs.field(default=None, validator=check_noise_shape)
    num_samples: int = attrs.field(default=1000, validator=positive_int)
    batch_size: int = attrs.field(default=250, validator=positive_int)
    kid_reservoir: int = attrs.field(default=1000, validator=positive_int)
    kid_subsets: int = attrs.field(default=50, validator=positive_int)
    kid_subset_size: int = attrs.field(default=500, validator=positive_int)
    every: int = attrs.field(default=1, validator=positive_int)
    ema: bool | None = attrs.field(default=None, validator=check_ema_choice)
    value_range: tuple[float, float] = attrs.field(default=(0.0, 1.0), validator=check_value_range)
    prefix: str = attrs.field(default="eval", validator=non_empty_str)
    seed: int = 0
    priority: int = QUALITY_PRIORITY
    _extract: Extractor = attrs.field(init=False)
    _images: torch.Tensor = attrs.field(init=False)
    _emas: list[Any] = attrs.field(factory=list, init=False)
    _real: tuple[FeatureStatistics, FeatureReservoir] | None = attrs.field(default=None, init=False)
    _fake: tuple[FeatureStatistics, FeatureReservoir] | None = attrs.field(default=None, init=False)
    _logged: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if self.reference is None:
            raise ConfigError(
                "QualityMetrics needs reference images: a tensor, a dict with 'data', or an "
                "import path such as 'examples.gan_data:digits_images'"
            )
        self._images = load_reference(self.reference, self.reference_args)
        self._extract = build_extractor(self.extractor, self.extractor_args)
        if self.source == "reconstructions" and self.num_samples > len(self._images):
            raise ConfigError(
                f"num_samples={self.num_samples} reconstructions need as many reference images; "
                f"the reference has {len(self._images)}"
            )

    def metric_names(self) -> list[str]:
        """The metrics this callback adds to an epoch's (the engine's pre-flight reads them, so
        ``monitor="eval/fid"`` is known before the first step)."""
        return [f"{self.prefix}/{name}" for name in METRICS]

    # ---------------------------------------------------------------- events

    def on_fit_start(self, run: RunState) -> None:
        self._emas = find_emas(run, self.ema, "QualityMetrics")
        if self.source == "samples":
            resolve_method(run.model, self.method)
            noise_shape_of(run.model, self.noise_shape)
            check_sharded_method(run, self.method, "QualityMetrics")
        self._logged = False

    def on_epoch_end(self, run: RunState) -> None:
        if run.progress.epoch % self.every != 0:
            return
        metrics = self.measure(run)
        run.epoch_metrics.update(metrics)
        _track_best(run, metrics)

    # ---------------------------------------------------------------- measuring

    def measure(self, run: RunState) -> dict[str, float]:
        """FID and KID of the model now against the reference (a collective under torchrun:
        every rank calls it at the same point)."""
        model = run.model
        device = next(model.parameters()).device
        world = run.context.world if run.context is not None else World()
        if not self._logged and run.is_main_process and run.log is not None:
            weights = "EMA" if self._emas else "raw"
            run.log.info(
                f"QualityMetrics: {self.source} of the {weights} weights, "
                f"{self.num_samples} against {len(self._images)} reference images"
            )
            self._logged = True
        if isinstance(self._extract, torch.nn.Module):
            self._extract.to(device)
        with quiet_eval(model, device):
            if self._real is None:
                self._real = self._stream(self._reference_batches(device, world), world, "real")
            with ema_weights(self._emas):
                fake = self._stream(self._generated_batches(run, device, world), world, "fake")
        real_stats, real_reservoir = self._real
        fake_stats, fake_reservoir = fake
        fid = fid_from_statistics(real_stats, fake_stats)
        kid, kid_std = kernel_inception_distance(
            real_reservoir.gathered(world),
            fake_reservoir.gathered(world),
            self.kid_subsets,
            self.kid_subset_size,
            self.seed,
        )
        return dict(zip(self.metric_names(), (fid, kid, kid_std)))

    def _stream(
        self, batches: Iterator[torch.Tensor], world: World, side: str
    ) -> tuple[FeatureStatistics, FeatureReservoir]:
        """Features of every batch into this side's statistics (reset, or made on first use)."""
        kept = self._fake if side == "fake" else None
        if kept is not None:
            kept[0].reset()
            kept[1].reset()
        for images in batches:
            features = check_features(self._extract(images), len(images), self._extract)
            if kept is None:
                capacity = math.ceil(self.kid_reservoir / world.world_size)
                seed = self.seed * 2 + (side == "fake") + 1_000_003 * world.rank
                kept = (
                    FeatureStatistics(features.shape[1], features.device),
                    FeatureReservoir(capacity, features.shape[1], seed, features.device),
                )
            kept[0].add(features)
            kept[1].add(features)
        if kept is None:  # this rank had no batch: its sums are zero, of the agreed size
            kept = self._empty_like(world)
        kept[0].merge_over_ranks(world)
        if side == "fake":
            self._fake = kept
        return kept

    def _empty_like(self, world: World) -> tuple[FeatureStatistics, FeatureReservoir]:
        probe = self._extract(self._scaled(self._images[:2]))
        dim = check_features(probe, 2, self._extract).shape[1]
        capacity = math.ceil(self.kid_reservoir / world.world_size)
        return FeatureStatistics(dim, probe.device), FeatureReservoir(
            capacity, dim, 0, probe.device
        )

    def _scaled(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.value_range
        return ((images - low) / (high - low)).clamp(0, 1)

    def _reference_batches(self, device: torch.device, world: World) -> Iterator[torch.Tensor]:
        for number, start in enumerate(range(0, len(self._images), self.batch_size)):
            if number % world.world_size == world.rank:
                yield self._scaled(self._images[start : start + self.batch_size].to(device))

    def _generated_batches(
        self, run: RunState, device: torch.device, world: World
    ) -> Iterator[torch.Tensor]:
        """This rank's share of the generated images, batch ``b`` on rank ``b % world_size``.
        Under FSDP every rank calls the model as many times as the rank with the most batches:
        a rank out of batches runs the last batch again and yields nothing of it."""
        batches = math.ceil(self.num_samples / self.batch_size)
        turns = math.ceil(batches / world.world_size)
        lockstep = is_sharded_model(run.model)
        for turn in range(turns):
            number = turn * world.world_size + world.rank
            if number < batches:
                yield self._scaled(self._generate(run, device, number).float())
            elif lockstep:
                self._generate(run, device, batches - 1)  # padding: a forward, not measured

    def _generate(self, run: RunState, device: torch.device, number: int) -> torch.Tensor:
        """The images of batch ``number``: the model's samples from that batch's noise, or its
        reconstructions of that batch of reference images."""
        model = run.model
        start = number * self.batch_size
        count = min(self.batch_size, self.num_samples - start)
        if self.source == "reconstructions":
            batch = {"data": self._images[start : start + count].to(device)}
            outputs = run.engine.forward(model, batch)
            images = outputs.get("recon_x") if isinstance(outputs, Mapping) else None
            if not isinstance(images, torch.Tensor):
                raise ModelOutputError(
                    "QualityMetrics(source='reconstructions'): the model's forward gives no "
                    "'recon_x' tensor"
                )
            return images.reshape(batch["data"].shape)
        shape = noise_shape_of(model, self.noise_shape)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
        noise = torch.randn((count, *shape), generator=generator).to(device)
        images = resolve_method(model, self.method)(noise)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ModelOutputError(
                f"method {self.method!r} must return images (N, C, H, W), got "
                f"{getattr(images, 'shape', type(images).__name__)}"
            )
        return images


def _track_best(run: RunState, metrics: Mapping[str, float]) -> None:
    """The run's best value and epoch, when its monitor is one of ``metrics``."""
    monitor = run.monitor
    if monitor is None or monitor not in metrics:
        return
    value = metrics[monitor]
    if not math.isfinite(value):
        return
    best, mode = run.best_value, run.config.monitor_mode
    if best is None or (value < best if mode == "min" else value > best):
        run.best_value, run.best_epoch = value, run.progress.epoch - 1

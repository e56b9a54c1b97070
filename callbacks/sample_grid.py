"""Fixed-noise sample grids a person can follow over a run: one PNG per epoch, plus a strip.

At every ``every``-th EPOCH_END, on the main process, ``SampleGrid`` feeds the same noise (drawn
once from ``seed`` at the first FIT_START, kept in its ``state_dict`` so a resumed run shows the
same draws) to the model's sampler, ``model.sample(noise)`` or another ``method`` (a dotted path
such as ``"generator"``), and, for autoencoders (``reconstructions=True``), runs the model's
forward on a fixed ``image_batch`` and shows its ``recon_x`` under the inputs. It writes:

* ``run_dir/<folder>/samples_epoch_003.png``: "epoch 3" in the title; a column per weight set,
  ``raw`` and, when an ``EMA`` callback is in the run, ``EMA`` beside it; rows ``samples``,
  and for an autoencoder ``inputs`` over ``reconstructions``. A pure GAN has no inputs row;
* ``run_dir/<folder>/samples_strip.png``: one row per epoch (at most ``strip_rows``, evenly
  spaced, the last always kept), the first ``strip_columns`` images of each column side by
  side, so the progress of the same noise reads top to bottom.

The model runs in eval mode under ``no_grad`` inside a forked RNG, so drawing changes nothing the
training sees (a resumed run stays exact). Under FSDP (``parallel="fsdp"``) every rank runs the
model with rank 0, in lockstep (a sharded forward gathers from every rank), and rank 0 alone
writes; a ``method`` that is not registered for FSDP (``fsdp_forward_methods``) is refused at
FIT_START, naming it. Images are shown in ``value_range`` (default [0, 1];
``(-1, 1)`` for a tanh generator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from callbacks.ema import EMA
from callbacks.extras import require_extra
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
    runs_the_model,
)
from callbacks.plots import as_images
from engine.config.validators import (
    is_bool,
    non_empty_str,
    plain_folder_name,
    positive_int,
)
from engine.errors import ConfigError, ModelOutputError
from engine.state import RunState

RAW, AVERAGED = "raw", "EMA"
TILE_INCHES = 0.55  # the side of one image in the PNGs
PAD, BACKGROUND = 2, 0.5  # gray lines between the images, so a black background stays apart


def _batch_inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and isinstance(batch.get("data"), torch.Tensor):
        return batch["data"]
    raise ConfigError(
        f"image_batch must be a tensor or a dict with a 'data' tensor, got {type(batch).__name__}"
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def tile(images: torch.Tensor, columns: int, pad: int = PAD) -> torch.Tensor:
    """(N, C, H, W) images as one (C, rows * (H + pad) - pad, columns * (W + pad) - pad) grid,
    ``pad`` gray pixels between the tiles and in empty cells."""
    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = torch.full(
        (channels, rows * (height + pad) - pad, columns * (width + pad) - pad), BACKGROUND
    )
    for index in range(count):
        top, left = (index // columns) * (height + pad), (index % columns) * (width + pad)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@attrs.define(eq=False)
class SampleGrid:
    """``SampleGrid(num_samples=16, columns=8, samples=True, method="sample", reconstructions=False,
    ema=None, every=1, ...)``: see the module docstring. ``ema=None`` shows the EMA column
    when the run has an ``EMA`` callback; ``samples=False`` shows no samples (an autoencoder
    without a prior)."""

    image_batch: Any = None
    num_samples: int = attrs.field(default=16, validator=positive_int)
    columns: int = attrs.field(default=8, validator=positive_int)
    samples: bool = attrs.field(default=True, validator=is_bool)
    method: str = attrs.field(default="sample", validator=non_empty_str)
    noise_shape: tuple[int, ...] | None = attrs.field(default=None, validator=check_noise_shape)
    reconstructions: bool = attrs.field(default=False, validator=is_bool)
    recon_key: str = attrs.field(default="recon_x", validator=non_empty_str)
    ema: bool | None = attrs.field(default=None, validator=check_ema_choice)
    seed: int = 0
    every: int = attrs.field(default=1, validator=positive_int)
    strip_rows: int = attrs.field(default=16, validator=positive_int)
    strip_columns: int = attrs.field(default=8, validator=positive_int)
    value_range: tuple[float, float] = attrs.field(default=(0.0, 1.0), validator=check_value_range)
    folder: str = attrs.field(default="samples", validator=plain_folder_name)
    dpi: int = attrs.field(default=100, validator=positive_int)
    priority: int = 0
    noise: torch.Tensor | None = attrs.field(default=None, init=False)
    strip: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _emas: list[EMA] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        require_extra("matplotlib", "plots", "SampleGrid")
        if not self.samples and not self.reconstructions:
            raise ConfigError(
                "SampleGrid shows nothing with samples=False and reconstructions=False: set "
                "samples=True (the model's sampler is method='sample') or reconstructions=True"
            )
        if self.reconstructions:
            if self.image_batch is None:
                raise ConfigError(
                    "SampleGrid(reconstructions=True) needs an image_batch (the CLI passes the "
                    "first eval samples)"
                )
            _batch_inputs(self.image_batch)

    # ---------------------------------------------------------------- events

    def on_fit_start(self, run: RunState) -> None:
        self._emas = find_emas(run, self.ema, "SampleGrid")
        if self.samples:
            resolve_method(run.model, self.method)
            check_sharded_method(run, self.method, "SampleGrid")
            if self.noise is None:
                shape = noise_shape_of(run.model, self.noise_shape)
                generator = torch.Generator().manual_seed(self.seed)
                self.noise = torch.randn((self.num_samples, *shape), generator=generator)
        if run.is_main_process and run.log is not None and self._emas:
            run.log.info(f"SampleGrid shows raw and EMA weights side by side ({len(self._emas)})")

    def on_epoch_end(self, run: RunState) -> None:
        if run.progress.epoch % self.every == 0:
            self.draw(run)

    # ---------------------------------------------------------------- drawing

    def draw(self, run: RunState) -> dict[str, dict[str, torch.Tensor]] | None:
        """Write this epoch's PNG and the strip (rank 0); returns the images by column and row
        (None where this rank draws nothing). Under FSDP every rank runs the model."""
        if not runs_the_model(run):
            return None
        columns = self.images(run)
        if not run.is_main_process or run.run_dir is None:
            return columns
        epoch = run.progress.epoch
        folder = run.run_dir / self.folder
        folder.mkdir(exist_ok=True)
        path = folder / f"samples_epoch_{epoch:03d}.png"
        self._save_epoch(path, epoch, columns)
        kind = "samples" if "samples" in columns[RAW] else "reconstructions"
        row = {name: _to_uint8(rows[kind][: self.strip_columns]) for name, rows in columns.items()}
        if kind == "reconstructions":
            row = {"inputs": _to_uint8(columns[RAW]["inputs"][: self.strip_columns]), **row}
        self.strip = [entry for entry in self.strip if entry["epoch"] < epoch]
        self.strip.append({"epoch": epoch, "images": row})
        self._save_strip(folder / "samples_strip.png", kind)
        run.paths["samples"] = folder
        return columns

    def images(self, run: RunState) -> dict[str, dict[str, torch.Tensor]]:
        """``{"raw": {"samples": ..., "inputs": ..., "reconstructions": ...}, "EMA": {...}}``
        as (N, C, H, W) CPU tensors in [0, 1]."""
        model = run.model
        device = next(model.parameters()).device
        columns: dict[str, dict[str, torch.Tensor]] = {}
        with quiet_eval(model, device):
            columns[RAW] = self._rows(run, device)
            if self._emas:
                with ema_weights(self._emas):
                    columns[AVERAGED] = self._rows(run, device)
        return columns

    def _rows(self, run: RunState, device: torch.device) -> dict[str, torch.Tensor]:
        rows: dict[str, torch.Tensor] = {}
        low, high = self.value_range
        if self.reconstructions:
            inputs = _batch_inputs(self.image_batch)
            outputs = run.engine.forward(run.model, _to_device(self.image_batch, device))
            recon = outputs.get(self.recon_key) if isinstance(outputs, Mapping) else None
            if not isinstance(recon, torch.Tensor):
                keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
                raise ModelOutputError(
                    f"SampleGrid(reconstructions=True): the model's forward gives no "
                    f"{self.recon_key!r} tensor (outputs: {keys})"
                )
            rows["inputs"] = ((as_images(inputs) - low) / (high - low)).clamp(0, 1)
            rows["reconstructions"] = ((as_images(recon, like=inputs) - low) / (high - low)).clamp(
                0, 1
            )
        if self.samples and self.noise is not None:
            sample = resolve_method(run.model, self.method)
            values = sample(self.noise.to(device))
            if not isinstance(values, torch.Tensor):
                raise ModelOutputError(
                    f"method {self.method!r} must return an image tensor, got "
                    f"{type(values).__name__}"
                )
            rows["samples"] = ((as_images(values) - low) / (high - low)).clamp(0, 1)
        return rows

    def _save_epoch(
        self, path: Path, epoch: int, columns: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        kinds = list(next(iter(columns.values())))
        tiles = {kind: columns[RAW][kind] for kind in kinds}
        heights = [math.ceil(len(t) / self.columns) for t in tiles.values()]
        per_tile = TILE_INCHES
        figure = _figure(
            (
                len(columns) * min(self.columns, max(len(t) for t in tiles.values())) * per_tile
                + 0.4,
                sum(heights) * per_tile + 0.45 * len(kinds) + 0.5,
            ),
            self.dpi,
        )
        grid = figure.add_gridspec(len(kinds), len(columns), height_ratios=heights)
        for row, kind in enumerate(kinds):
            for column, (name, rows) in enumerate(columns.items()):
                axes = figure.add_subplot(grid[row, column])
                _show(axes, tile(rows[kind], self.columns))
                label = kind if kind == "inputs" else f"{kind} ({name})"
                axes.set_title(label, fontsize=9)
        figure.suptitle(f"epoch {epoch}", fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=self.dpi)

    def _save_strip(self, path: Path, kind: str) -> None:
        entries = _spread(self.strip, self.strip_rows)
        names = list(entries[0]["images"])
        count = max(len(images) for entry in entries for images in entry["images"].values())
        channels, height, width = entries[0]["images"][names[0]].shape[1:]
        block = count * (width + PAD) - PAD
        gap = max(4, width // 2)  # white space between the columns
        pitch = height + PAD
        canvas = torch.ones(channels, len(entries) * pitch - PAD, len(names) * (block + gap) - gap)
        for row, entry in enumerate(entries):
            for position, name in enumerate(names):
                grid = tile(entry["images"][name].float() / 255, count)
                top, left = row * pitch, position * (block + gap)
                canvas[:, top : top + grid.shape[1], left : left + grid.shape[2]] = grid
        scale = TILE_INCHES / max(height, width) * 0.8
        figure = _figure((canvas.shape[2] * scale + 1.2, canvas.shape[1] * scale + 0.7), self.dpi)
        axes = figure.add_subplot(1, 1, 1)
        _show(axes, canvas, axis_off=False)
        axes.set_yticks([row * pitch + height / 2 for row in range(len(entries))])
        axes.set_yticklabels([f"epoch {entry['epoch']}" for entry in entries], fontsize=8)
        axes.set_xticks([p * (block + gap) + block / 2 for p in range(len(names))])
        axes.set_xticklabels(names, fontsize=9)
        axes.xaxis.tick_top()
        axes.tick_params(length=0)
        for spine in axes.spines.values():
            spine.set_visible(False)
        same = " (same noise)" if kind == "samples" else ""
        axes.set_title(f"{kind} over epochs{same}", fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=self.dpi)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "strip": [
                {"epoch": entry["epoch"], "images": dict(entry["images"])} for entry in self.strip
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        noise = state["noise"]
        if noise is not None and not isinstance(noise, torch.Tensor):
            raise TypeError(f"SampleGrid state: noise must be a tensor, got {type(noise).__name__}")
        self.noise = noise
        self.strip = [
            {"epoch": int(entry["epoch"]), "images": dict(entry["images"])}
            for entry in state["strip"]
        ]


def _spread(entries: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` of ``entries``, evenly spaced, the first and the last kept."""
    if len(entries) <= limit:
        return entries
    if limit == 1:
        return entries[-1:]
    step = (len(entries) - 1) / (limit - 1)
    return [entries[round(index * step)] for index in range(limit)]


def _figure(size: tuple[float, float], dpi: int) -> Any:
    require_extra("matplotlib", "plots", "SampleGrid")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _show(axes: Any, grid: torch.Tensor, axis_off: bool = True) -> None:
    if grid.shape[0] == 1:
        axes.imshow(grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    if axis_off:
        axes.axis("off")

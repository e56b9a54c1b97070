"""PNG plots in the run folder: a loss curve per metric, and for autoencoders a grid of inputs,
their reconstructions and samples from the prior. Also the image helpers that trackers share.

The grid shows the run's ``EMA`` weights when the run keeps an EMA (``ema=None``, the default;
``ema=True`` requires one, ``ema=False`` shows the raw weights), and its panel titles say which
weights they show; the raw weights come back bitwise after drawing. Under FSDP
(``parallel="fsdp"``) every rank runs the model for ``images.png`` with rank 0, in lockstep (a
sharded forward gathers from every rank), and rank 0 alone writes; a model whose ``sample`` is
not registered for FSDP (``fsdp_forward_methods``) is refused at FIT_START, naming it.

matplotlib is an optional extra (``strategy-engine[plots]``), imported when a ``Plots`` is made;
figures are drawn on matplotlib's Agg canvas directly, so no global backend is ever switched.
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
    check_sharded_method,
    ema_weights,
    find_emas,
    quiet_eval,
    runs_the_model,
)
from engine.config.validators import figsize_inches, positive_int
from engine.errors import ConfigError, ModelOutputError
from engine.state import RunState

# ----------------------------------------------------------------------------- images


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and isinstance(batch.get("data"), torch.Tensor):
        return batch["data"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ConfigError(
        f"image_batch must be a tensor, a dict with a 'data' tensor or a tuple of tensors, "
        f"got {type(batch).__name__}"
    )


def as_images(values: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` as an (N, C, H, W) float tensor on the CPU: (N, H, W) gains a channel, and
    flat (N, D) vectors take the shape of ``like`` when the sizes match."""
    values = values.detach().float().cpu()
    if values.ndim == 2 and like is not None and values[0].numel() == like[0].numel():
        values = values.reshape(len(values), *like.shape[1:])
    if values.ndim == 3:
        values = values.unsqueeze(1)
    if values.ndim != 4 or values.shape[1] not in (1, 3):
        raise ModelOutputError(
            f"can not show a tensor of shape {tuple(values.shape)} as images: expected "
            "(N, C, H, W) with 1 or 3 channels, (N, H, W), or vectors the size of the inputs"
        )
    return values


def autoencoder_images(run: RunState, batch: Any, num_samples: int) -> dict[str, torch.Tensor]:
    """``inputs``, ``reconstructions`` (the model's ``recon_x``) and ``samples``
    (``model.sample(n)``, where the model has one) as (N, C, H, W) CPU tensors.

    The model runs in eval mode without gradients, inside a forked RNG, so drawing pictures
    changes nothing the training sees (resume stays exact)."""
    model = run.model
    device = next(model.parameters()).device
    inputs = _inputs_of(batch)
    images = {"inputs": as_images(inputs)}
    with quiet_eval(model, device):
        outputs = run.engine.forward(model, _to_device(batch, device))
        recon = outputs.get("recon_x") if isinstance(outputs, Mapping) else None
        if isinstance(recon, torch.Tensor):
            images["reconstructions"] = as_images(recon, like=inputs).clamp(0, 1)
        sample = getattr(model, "sample", None)
        if callable(sample):
            images["samples"] = as_images(sample(num_samples), like=inputs).clamp(0, 1)
    if len(images) == 1:
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ModelOutputError(
            f"{type(model).__name__} gives nothing to show: no 'recon_x' output (outputs: "
            f"{keys}) and no sample(n) method"
        )
    return images


def tile_images(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, C, H, W) images as one (C, rows * (H + 1) - 1, columns * (W + 1) - 1) grid, one pixel
    of background between tiles; empty cells stay at zero."""
    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = torch.zeros(channels, rows * (height + 1) - 1, columns * (width + 1) - 1)
    for index in range(count):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


# ----------------------------------------------------------------------------- figures


def _new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    require_extra("matplotlib", "plots", "Plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(float(figsize[0]), float(figsize[1])), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_loss_curve(
    path: Path, name: str, history: list[dict[str, float]], figsize: Any, dpi: int
) -> None:
    """One PNG: ``train/<name>`` and ``eval/<name>`` against the epoch."""
    figure = _new_figure(figsize, dpi)
    axes = figure.add_subplot(1, 1, 1)
    for split in ("train", "eval"):
        key = f"{split}/{name}"
        points = [(r["epoch"] + 1, r[key]) for r in history if key in r and "epoch" in r]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o", markersize=3, label=split)
    axes.set_xlabel("epoch")
    axes.set_ylabel(name)
    axes.set_title(name)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)


def save_image_grid(
    path: Path, images: Mapping[str, torch.Tensor], columns: int, figsize: Any, dpi: int
) -> None:
    """One PNG with a panel per entry of ``images`` (inputs, reconstructions, samples)."""
    figure = _new_figure(figsize, dpi)
    for row, (title, values) in enumerate(images.items()):
        axes = figure.add_subplot(len(images), 1, row + 1)
        grid = tile_images(values, columns)
        if grid.shape[0] == 1:
            axes.imshow(grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            axes.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)


def weights_label(emas: list[EMA]) -> str:
    """Which weights a picture shows: ``"raw weights"``, or ``"EMA weights of model.generator"``
    (of each averaged module; ``the whole model`` for an EMA of all of it)."""
    if not emas:
        return "raw weights"
    names = ["the whole model" if ema.module is None else f"model.{ema.module}" for ema in emas]
    return "EMA weights of " + ", ".join(names)


def titled_images(images: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """The panels of ``images.png`` by title: the model's pictures titled with ``label`` (which
    weights drew them), after the inputs they reconstruct; a model with no reconstructions (a
    GAN) has nothing to compare its inputs with, so they are left out."""
    titled = {}
    if "reconstructions" in images:
        titled["inputs"] = images["inputs"]
    for name, values in images.items():
        if name != "inputs":
            titled[f"{name} ({label})"] = values
    return titled


@attrs.define(eq=False)
class Plots:
    """PNGs in ``run_dir/<folder>/``, redrawn at every ``every``-th EPOCH_END on rank 0.

    ``loss_<name>.png`` per metric (train and eval curves of ``train/<name>``/``eval/<name>``);
    with an ``image_batch`` (e.g. ``{"data": first_16_images}``; the CLI passes the first eval
    samples), ``images.png`` shows those inputs (left out where the model gives no ``recon_x``:
    a GAN), the model's ``recon_x`` and ``model.sample(n)``, with the run's EMA weights where
    ``ema`` is True, or None and the run has an ``EMA`` callback (the titles say which weights).
    Every PNG is ``figsize`` inches at ``dpi`` (so ``figsize[0] * dpi`` pixels wide).
    """

    image_batch: Any = None
    every: int = attrs.field(default=1, validator=positive_int)
    columns: int = attrs.field(default=8, validator=positive_int)
    num_samples: int = attrs.field(default=16, validator=positive_int)
    figsize: tuple[float, float] = attrs.field(default=(6.4, 4.8), validator=figsize_inches)
    dpi: int = attrs.field(default=100, validator=positive_int)
    folder: str = "plots"
    ema: bool | None = attrs.field(default=None, validator=check_ema_choice)
    priority: int = 0
    _drawn_epoch: int = attrs.field(default=-1, init=False)
    _emas: list[EMA] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        require_extra("matplotlib", "plots", "Plots")
        if self.image_batch is not None:
            _inputs_of(self.image_batch)
        elif self.ema is True:
            raise ConfigError(
                "Plots(ema=True) chooses the weights images.png shows, but there is no "
                "image_batch to draw images of"
            )

    def on_fit_start(self, run: RunState) -> None:
        """Find the run's EMA (``ema=True`` without one is a ``ConfigError`` here)."""
        self._emas = find_emas(run, self.ema, "Plots") if self.image_batch is not None else []
        if self.image_batch is not None and callable(getattr(run.model, "sample", None)):
            check_sharded_method(run, "sample", "Plots")
        if self._emas and run.is_main_process and run.log is not None:
            run.log.info(f"Plots draws images.png with the {weights_label(self._emas)}")

    def on_epoch_end(self, run: RunState) -> None:
        if run.progress.epoch % self.every == 0:
            self._draw(run)

    def on_fit_end(self, run: RunState) -> None:
        """Draw the final state too, when the last epoch was not an ``every``-th one."""
        if run.history and self._drawn_epoch != run.progress.epoch:
            self._draw(run)

    def _draw(self, run: RunState) -> None:
        """The PNGs (rank 0); under FSDP every rank runs the model for ``images.png``."""
        if not runs_the_model(run):
            return
        images = None
        if self.image_batch is not None:
            with ema_weights(self._emas):
                images = autoencoder_images(run, self.image_batch, self.num_samples)
        self._drawn_epoch = run.progress.epoch
        if not run.is_main_process or run.run_dir is None:
            return
        folder = run.run_dir / self.folder
        folder.mkdir(exist_ok=True)
        names = sorted(
            {
                key.split("/", 1)[1]
                for key in run.epoch_metrics
                if key.startswith(("train/", "eval/"))
            }
        )
        for name in names:
            path = folder / f"loss_{name.replace('/', '_')}.png"
            save_loss_curve(path, name, run.history, self.figsize, self.dpi)
        if images is not None:
            titled = titled_images(images, weights_label(self._emas))
            save_image_grid(folder / "images.png", titled, self.columns, self.figsize, self.dpi)
        run.paths["plots"] = folder

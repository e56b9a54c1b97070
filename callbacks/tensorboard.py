"""TensorBoard: scalars per log interval and per epoch, and image grids of reconstructions and
samples, written with ``torch.utils.tensorboard`` (optional extra ``strategy-engine[tensorboard]``).
"""

from __future__ import annotations

from typing import Any

import attrs

from callbacks.extras import require_extra
from callbacks.plots import autoencoder_images, tile_images
from callbacks.tracking import interval_metrics, tracker_folder
from engine.config.validators import positive_int
from engine.state import RunState


@attrs.define(eq=False)
class TensorBoard:
    """Event files in ``log_dir`` (default ``run_dir/tensorboard``), on rank 0 only.

    Every ``log_every`` steps: ``step/<metric>`` (the interval's means, and ``lr/<role>`` with a
    ``LearningRateMonitor``); every epoch: all epoch metrics (``train/...``, ``eval/...``,
    ``lr/...``), all at the global step. With an ``image_batch``, every ``image_every``
    epochs: ``images/inputs``, ``images/reconstructions`` and ``images/samples``. The writer
    opens at FIT_START and closes at FIT_END or on an exception: no set-up call is needed.
    """

    log_dir: str | None = None
    image_batch: Any = None
    image_every: int = attrs.field(default=1, validator=positive_int)
    columns: int = attrs.field(default=8, validator=positive_int)
    num_samples: int = attrs.field(default=16, validator=positive_int)
    priority: int = 0
    _writer: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        require_extra("tensorboard", "tensorboard", "The TensorBoard callback")

    def on_fit_start(self, run: RunState) -> None:
        folder = tracker_folder(
            run, self.log_dir, who="TensorBoard", option="log_dir", subfolder="tensorboard"
        )
        if folder is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))
        run.paths["tensorboard"] = folder

    def on_batch_end(self, run: RunState) -> None:
        metrics = interval_metrics(run)
        if self._writer is None or metrics is None:
            return
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, run.progress.step)

    def on_epoch_end(self, run: RunState) -> None:
        if self._writer is None:
            return
        step = run.progress.step
        for key, value in run.epoch_metrics.items():
            self._writer.add_scalar(key, value, step)
        if self.image_batch is not None and run.progress.epoch % self.image_every == 0:
            images = autoencoder_images(run, self.image_batch, self.num_samples)
            for name, values in images.items():
                self._writer.add_image(f"images/{name}", tile_images(values, self.columns), step)
        self._writer.flush()

    def on_fit_end(self, run: RunState) -> None:
        """Close the writer; an exception closes it the same way."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    on_exception = on_fit_end

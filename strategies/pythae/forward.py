"""What pythae's ``BaseTrainer`` gives a model beyond the batch, as the engine's forward and
two plain event handlers.

pythae 0.1.2 calls ``model(inputs, epoch=epoch, dataset_size=len(loader.dataset),
uses_ddp=distributed)`` for every batch, training and evaluation alike: ``epoch`` counts from 1,
``dataset_size`` is the training set's size in training and the evaluation set's during
evaluation (the whole set, not one rank's share), ``uses_ddp`` is true under several processes.
DisentangledBetaVAE and VAMP schedule their loss by ``epoch``, BetaTCVAE weighs by
``dataset_size``, VQVAE's EMA quantizer all-reduces its codebook statistics when ``uses_ddp``.

pythae then calls ``model.update()`` after each epoch's training batches, before evaluating
(RHVAE rebuilds its metric there), and sets ``model.device`` (VAMP and RAE_GP read it).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from engine.state import RunState


@attrs.define(eq=False)
class PythaeForward:
    """The engine's ``forward``: ``model(batch, epoch=, dataset_size=, uses_ddp=, **kwargs)``.

    ``epoch`` is set by ``start_epoch`` (subscribed to ``EPOCH_START``) and stays at the last
    epoch after a fit; before any epoch it is left out, so the model uses its own default.
    Training and evaluation are told apart by ``model.training``, as the engine trains in
    train mode and evaluates in eval mode; ``eval_size`` is the size of the data being
    evaluated (``PythaeRun.evaluate`` sets it for other data).
    """

    train_size: int
    eval_size: int | None = None
    epoch: int | None = None
    uses_ddp: bool = False

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        size = self.train_size if model.training or self.eval_size is None else self.eval_size
        if self.epoch is not None:
            kwargs["epoch"] = self.epoch
        return model(batch, dataset_size=size, uses_ddp=self.uses_ddp, **kwargs)

    def start_epoch(self, run: RunState) -> None:
        """``EPOCH_START``: the epoch about to run, counted from 1 (a resumed run goes on)."""
        self.epoch = run.progress.epoch + 1

    def start_fit(self, run: RunState) -> None:
        """``FIT_START``: ``uses_ddp`` and ``model.device`` for this run's world and device."""
        assert run.context is not None, "the engine sets the context before FIT_START"
        self.uses_ddp = run.context.world.is_distributed
        run.model.device = run.context.device  # type: ignore[assignment]


def update_model(run: RunState) -> None:
    """``model.update()``, where pythae calls it: after an epoch's last training batch and
    before its evaluation (subscribed to ``EVAL_START`` when the run evaluates every epoch,
    to ``EPOCH_END`` when it has no evaluation data)."""
    run.model.update()  # type: ignore[operator]

"""What pythae's trainer tells a model beyond the batch reaches it through ``from_pythae``:
the same forward calls (mode, ``epoch``, ``dataset_size``, ``uses_ddp``, batch size) and
``model.update()`` at the same places, call for call."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("pythae")
pytest.importorskip("sklearn")

from pythae.models import VAE, VAEConfig

from engine import Event
from strategies.pythae import from_pythae
from tests.compat.pythae_zoo import digits, pythae_trainer, training_config


class RecordingVAE(VAE):  # type: ignore[misc]  # pythae's model class, as a pythae user writes one
    """pythae's VAE that records every forward's mode and arguments and every ``update()``."""

    def __init__(self) -> None:
        super().__init__(VAEConfig(input_dim=(1, 8, 8), latent_dim=2))
        self.calls: list[tuple[Any, ...]] = []

    def forward(self, inputs: Any, **kwargs: Any) -> Any:
        self.calls.append(
            (
                "train" if self.training else "eval",
                kwargs.get("epoch"),
                kwargs.get("dataset_size"),
                kwargs.get("uses_ddp"),
                len(inputs["data"]),
            )
        )
        return super().forward(inputs, **kwargs)

    def update(self) -> None:
        self.calls.append(("update",))


def test_forward_arguments_and_updates_are_pythaes_call_for_call(tmp_path: Path) -> None:
    images = digits(56)
    train, held_out = images[:40], images[40:]  # 3 training batches of 16, 16, 8; 1 eval batch
    torch.manual_seed(0)
    model = RecordingVAE()
    config = training_config(model, tmp_path, epochs=3)
    trainer = pythae_trainer(model, config, train, held_out)
    twin = copy.deepcopy(trainer.model)
    model.calls.clear()  # pythae's sanity-check forward at construction
    trainer.train()
    run = from_pythae(twin, config, train, held_out, overrides={"output_dir": None})
    run.engine.on(Event.FIT_START, lambda state: twin.calls.clear())  # the engine's check
    run.fit()
    assert twin.calls == model.calls
    assert model.calls[:5] == [
        ("train", 1, 40, False, 16),
        ("train", 1, 40, False, 16),
        ("train", 1, 40, False, 8),
        ("update",),
        ("eval", 1, 16, False, 16),
    ]
    assert model.calls.count(("update",)) == 3


def test_without_eval_data_update_runs_at_each_epochs_end_and_evaluate_passes_its_size(
    tmp_path: Path,
) -> None:
    images = digits(40)
    torch.manual_seed(0)
    model = RecordingVAE()
    run = from_pythae(
        model, training_config(model, tmp_path, epochs=2), images, overrides={"output_dir": None}
    )
    ends: list[int] = []
    run.engine.on(Event.FIT_START, lambda state: model.calls.clear())
    run.engine.on(Event.EPOCH_END, lambda state: ends.append(len(model.calls)))
    run.fit()
    updates = [index for index, call in enumerate(model.calls) if call == ("update",)]
    assert updates == [3, 7] and ends == [4, 8]
    model.calls.clear()
    run.evaluate(images[:24])
    assert model.calls == [("eval", 2, 24, False, 16), ("eval", 2, 24, False, 8)]


def test_before_any_epoch_the_model_keeps_its_own_default_epoch() -> None:
    torch.manual_seed(0)
    model = RecordingVAE()
    run = from_pythae(model, None, digits(8), overrides={"output_dir": None})
    run.evaluate()
    assert model.calls == [("eval", None, 8, False, 8)]

"""callbacks/plots.py with an EMA in the run: images.png is drawn from the EMA weights (ema=None
or True), from the raw ones when asked (ema=False) or when there is no EMA, and drawing leaves
the raw weights bitwise as training left them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from callbacks import EMA, Plots
from callbacks.plots import titled_images, weights_label
from engine import ConfigError, Engine, EngineConfig, OptimizerSpec
from strategies import Standard
from tests.callbacks.test_plots import png_size

PICTURED = 3  # samples in the image batch: a forward of this size is a drawing


class Recorder(nn.Module):
    """An autoencoder-shaped model that records the weights each drawing forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 2)
        self.decoder = nn.Linear(2, 16)
        self.drawn: list[dict[str, torch.Tensor]] = []

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"].flatten(1)
        if len(x) == PICTURED and not self.training:
            self.drawn.append({k: v.detach().clone() for k, v in self.named_parameters()})
        recon = torch.sigmoid(self.decoder(self.encoder(x)))
        return {"loss": (recon - x).pow(2).mean(), "recon_x": recon.view(-1, 1, 4, 4)}


def data(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))}


def fit(folder: Path, callbacks: list[Any], epochs: int = 2) -> tuple[Recorder, Any]:
    torch.manual_seed(0)
    model = Recorder()
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        EngineConfig(epochs=epochs, batch_size=8, output_dir=folder, run_name="run"),
        callbacks=callbacks,
    )
    return model, engine.fit(model, data(32, 0))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def raw_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def plots(**kwargs: Any) -> Plots:
    return Plots(image_batch=data(PICTURED, 1), dpi=20, **kwargs)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    module=st.sampled_from([None, "decoder"]),
    decay=st.floats(0.1, 0.9),
    every=st.integers(1, 2),
)
def test_images_show_the_ema_weights_and_leave_the_raw_ones_bitwise(
    module: str | None, decay: float, every: int, tmp_path_factory: Any
) -> None:
    """With an EMA in the run, every drawing sees the EMA weights of its module (and the raw
    weights of the rest); training ends bitwise as without the plots."""
    ema = EMA(module=module, decay=decay)
    model, result = fit(tmp_path_factory.mktemp("drawn"), [ema, plots(every=every)], epochs=3)
    assert len(model.drawn) == (3 if every == 1 else 2)  # every=2: epoch 2, and the last
    prefix = "" if module is None else f"{module}."
    expected = raw_weights(model)
    expected.update({prefix + k: v for k, v in ema.averaged.items()})
    assert same(model.drawn[-1], expected)
    assert not same(model.drawn[-1], raw_weights(model))
    again, _ = fit(tmp_path_factory.mktemp("again"), [EMA(module=module, decay=decay)], epochs=3)
    assert same(raw_weights(model), raw_weights(again))
    assert png_size(result.run_dir / "plots" / "images.png") == (128, 96)


@pytest.mark.parametrize(("choice", "with_ema"), [(False, True), (None, False), (False, False)])
def test_raw_weights_when_asked_or_without_an_ema(
    choice: bool | None, with_ema: bool, tmp_path: Path
) -> None:
    callbacks: list[Any] = [EMA(decay=0.5)] if with_ema else []
    model, _ = fit(tmp_path, [*callbacks, plots(ema=choice)])
    assert model.drawn and same(model.drawn[-1], raw_weights(model))


def test_ema_true_without_an_ema_in_the_run_is_refused_at_fit_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Plots\(ema=True\) needs an EMA callback"):
        fit(tmp_path, [plots(ema=True)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ema": "yes", "image_batch": data(2, 0)}, "ema must be true, false or None"),
        ({"ema": True}, r"Plots\(ema=True\) chooses the weights.*no image_batch"),
    ],
)
def test_bad_ema_choices_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Plots(**kwargs)


def test_the_titles_say_which_weights() -> None:
    assert weights_label([]) == "raw weights"
    assert weights_label([EMA(module="generator")]) == "EMA weights of model.generator"
    assert weights_label([EMA()]) == "EMA weights of the whole model"


def test_panels_are_titled_with_the_weights_and_a_gan_shows_no_inputs() -> None:
    images = {name: torch.zeros(2, 1, 4, 4) for name in ("inputs", "reconstructions", "samples")}
    assert list(titled_images(images, "raw weights")) == [
        "inputs",
        "reconstructions (raw weights)",
        "samples (raw weights)",
    ]
    generated = {name: torch.zeros(2, 1, 4, 4) for name in ("inputs", "samples")}
    label = "EMA weights of model.generator"
    assert list(titled_images(generated, label)) == [f"samples ({label})"]

"""callbacks/plots.py: valid PNGs of the expected size, image grids, and no effect on training."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from callbacks import Plots
from callbacks.plots import tile_images
from engine import Engine, EngineConfig, ModelOutputError, OptimizerSpec
from examples.models import VAE
from strategies import Standard
from tests.helpers import TinyRegressor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking the signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def images(n: int = 16) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))}


def fit(tmp_path: Path, model: nn.Module, callbacks: list[Any], epochs: int = 2) -> Any:
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-3)),
        EngineConfig(epochs=epochs, batch_size=16, output_dir=tmp_path, run_name="run"),
        callbacks=callbacks,
    )
    return engine.fit(model, images(32), images(16))


def test_loss_curves_and_image_grid_are_pngs_of_the_expected_size(tmp_path: Path) -> None:
    plots = Plots(image_batch=images(8), figsize=(4.0, 3.0), dpi=50, columns=4, num_samples=4)
    result = fit(tmp_path, VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=8), [plots])
    folder = result.run_dir / "plots"
    assert sorted(p.name for p in folder.iterdir()) == ["images.png", "loss_loss.png"]
    for path in folder.iterdir():
        assert png_size(path) == (200, 150)
    assert result.paths["plots"] == folder


def test_every_n_draws_then_the_final_state_at_fit_end(tmp_path: Path) -> None:
    plots = Plots(every=5)
    result = fit(tmp_path, TinyRegressor(), [plots], epochs=2)
    assert png_size(result.run_dir / "plots" / "loss_loss.png") == (640, 480)


def test_drawing_changes_nothing_training_sees(tmp_path: Path) -> None:
    def trained(callbacks: list[Any], folder: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=8)
        fit(folder, model, callbacks, epochs=3)
        return model.state_dict()

    plain = trained([], tmp_path / "a")
    drawn = trained([Plots(image_batch=images(4), num_samples=4, dpi=20)], tmp_path / "b")
    assert all(torch.equal(plain[key], drawn[key]) for key in plain)


def test_tile_images_places_every_image() -> None:
    values = torch.arange(5 * 2 * 2, dtype=torch.float32).reshape(5, 1, 2, 2) + 1
    grid = tile_images(values, columns=2)
    assert grid.shape == (1, 3 * 3 - 1, 2 * 3 - 1)
    assert grid[0, 3:5, 3:5].equal(values[3, 0])
    assert grid[0, 6:8, 3:5].eq(0).all()  # the empty sixth cell


class NothingToShow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 1)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.linear(batch["data"].flatten(1)).pow(2).mean()}


def test_a_model_with_no_reconstruction_and_no_sampler_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelOutputError, match=r"no 'recon_x' output \(outputs: \['loss'\]\)"):
        fit(tmp_path, NothingToShow(), [Plots(image_batch=images(4))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be a positive integer, got 0"),
        ({"figsize": (4, -1)}, r"figsize must be two positive numbers \(inches\), got \(4, -1\)"),
        ({"image_batch": "x"}, "image_batch must be a tensor.*got str"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    from engine import ConfigError

    with pytest.raises(ConfigError, match=message):
        Plots(**kwargs)


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'strategy-engine\[plots\]'"):
        Plots()

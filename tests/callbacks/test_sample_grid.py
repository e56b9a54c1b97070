"""callbacks/sample_grid.py: a PNG per epoch and a strip, fixed noise kept across a resume,
raw and EMA side by side, reconstructions for autoencoders, and no effect on training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from callbacks import EMA, Checkpointing, SampleGrid
from callbacks.sample_grid import _spread, tile
from engine import ConfigError, Engine, EngineConfig, OptimizerSpec, RunState
from strategies import Standard
from tests.callbacks.test_plots import png_size


class TinyGenerator(nn.Module):
    """``sample(noise)`` maps 3-d noise to 1x6x6 images; ``loss`` fits them to the data."""

    latent_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 36)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(noise)).view(-1, 1, 6, 6)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.sample(torch.randn(len(x), 3)) - x).pow(2).mean()}


class NoisyGenerator(nn.Module):
    """A ``TinyGenerator`` whose sampler also draws from the global RNG (noise injection)."""

    latent_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyGenerator()

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        images = self.inner.sample(noise)
        return (images + 0.01 * torch.randn_like(images)).clamp(0, 1)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        return dict(self.inner(batch))


class TinyAutoencoder(nn.Module):
    """``recon_x`` of 1x6x6 inputs through a 4-d code; no sampler."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(36, 4)
        self.decoder = nn.Linear(4, 36)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        recon_x = torch.sigmoid(self.decoder(self.encoder(x.flatten(1)))).view_as(x)
        return {"loss": (recon_x - x).pow(2).mean(), "recon_x": recon_x}


def seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def images(n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"data": torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))}


def fit(
    model: nn.Module,
    callbacks: list[Any],
    tmp_path: Path | None,
    epochs: int = 2,
    resume: str | None = None,
) -> Any:
    config = EngineConfig(
        epochs=epochs, batch_size=8, device="cpu", output_dir=tmp_path, run_name="run"
    )
    engine = Engine(Standard(OptimizerSpec("Adam", lr=1e-2)), config, callbacks)
    return engine.fit(model, images(), resume=resume)


class Drawn:
    """What ``SampleGrid.draw`` returned at each EPOCH_END (runs after it: lower priority)."""

    priority = -1

    def __init__(self, grid: SampleGrid) -> None:
        self.grid = grid
        self.columns: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_epoch_end(self, run: RunState) -> None:
        columns = self.grid.images(run)
        self.columns.append(columns)


def test_a_gan_gets_a_png_per_epoch_and_a_strip_without_an_inputs_row(tmp_path: Path) -> None:
    grid = SampleGrid(num_samples=6, columns=3, dpi=40)
    drawn = Drawn(grid)
    result = fit(TinyGenerator(), [grid, drawn], tmp_path, epochs=3)
    folder = result.run_dir / "samples"
    names = sorted(path.name for path in folder.iterdir())
    assert names == [
        "samples_epoch_001.png",
        "samples_epoch_002.png",
        "samples_epoch_003.png",
        "samples_strip.png",
    ]
    for path in folder.iterdir():
        width, height = png_size(path)
        assert width > 0 and height > 0
    assert list(drawn.columns[-1]) == ["raw"]
    assert list(drawn.columns[-1]["raw"]) == ["samples"]  # no inputs, no reconstructions
    assert drawn.columns[-1]["raw"]["samples"].shape == (6, 1, 6, 6)
    assert [entry["epoch"] for entry in grid.strip] == [1, 2, 3]
    assert result.paths["samples"] == folder


def test_with_an_ema_raw_and_ema_are_side_by_side(tmp_path: Path) -> None:
    ema = EMA(decay=0.9)
    grid = SampleGrid(num_samples=4, columns=4, dpi=40)
    drawn = Drawn(grid)
    model = TinyGenerator()
    fit(model, [ema, grid, drawn], tmp_path)
    columns = drawn.columns[-1]
    assert list(columns) == ["raw", "EMA"]
    assert grid.noise is not None
    with torch.no_grad():
        raw = model.sample(grid.noise)
        with ema.applied():
            averaged = model.sample(grid.noise)
    assert torch.equal(columns["raw"]["samples"], raw)
    assert torch.equal(columns["EMA"]["samples"], averaged)
    assert not torch.equal(raw, averaged)
    assert list(grid.strip[-1]["images"]) == ["raw", "EMA"]
    alone = SampleGrid(num_samples=4, columns=4, dpi=40)
    fit(TinyGenerator(), [alone], tmp_path / "alone")
    with_ema = png_size(tmp_path / "run" / "samples" / "samples_epoch_002.png")
    without = png_size(tmp_path / "alone" / "run" / "samples" / "samples_epoch_002.png")
    assert with_ema[0] > without[0] and with_ema[1] == without[1]


def test_an_autoencoder_shows_its_inputs_over_its_reconstructions(tmp_path: Path) -> None:
    batch = images(5, seed=3)
    grid = SampleGrid(image_batch=batch, samples=False, reconstructions=True, dpi=40)
    drawn = Drawn(grid)
    model = TinyAutoencoder()
    result = fit(model, [grid, drawn], tmp_path)
    rows = drawn.columns[-1]["raw"]
    assert list(rows) == ["inputs", "reconstructions"]
    assert torch.equal(rows["inputs"], batch["data"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(rows["reconstructions"], model(batch)["recon_x"])
    assert list(grid.strip[-1]["images"]) == ["inputs", "raw"]
    assert (result.run_dir / "samples" / "samples_strip.png").is_file()


def test_the_noise_is_drawn_once_and_kept_across_a_resume(tmp_path: Path) -> None:
    whole = SampleGrid(num_samples=4, seed=5, dpi=40)
    fit(seeded(TinyGenerator), [whole, Checkpointing(durable=False)], tmp_path / "a", epochs=4)
    first = SampleGrid(num_samples=4, seed=5, dpi=40)
    fit(seeded(TinyGenerator), [first, Checkpointing(durable=False)], tmp_path / "b", epochs=2)
    resumed = SampleGrid(num_samples=4, seed=99, dpi=40)  # the saved noise wins over the seed
    drawn = Drawn(resumed)
    fit(
        seeded(TinyGenerator),
        [resumed, drawn, Checkpointing(durable=False)],
        tmp_path / "b",
        epochs=4,
        resume="last",
    )
    assert whole.noise is not None and resumed.noise is not None
    assert torch.equal(resumed.noise, whole.noise)
    assert [entry["epoch"] for entry in resumed.strip] == [1, 2, 3, 4]
    for mine, theirs in zip(resumed.strip, whole.strip):
        assert torch.equal(mine["images"]["raw"], theirs["images"]["raw"])


def test_drawing_changes_nothing_the_training_sees(tmp_path: Path) -> None:
    plain = seeded(NoisyGenerator)
    fit(plain, [], None)
    pictured = seeded(NoisyGenerator)
    grid = SampleGrid(num_samples=4, dpi=40)
    fit(pictured, [grid, Drawn(grid)], tmp_path)
    assert len(grid.strip) == 2
    for key, value in plain.state_dict().items():
        assert torch.equal(value, pictured.state_dict()[key]), key


def test_the_strip_keeps_rows_evenly_spaced_with_the_last() -> None:
    entries = [{"epoch": epoch} for epoch in range(1, 41)]
    picked = [entry["epoch"] for entry in _spread(entries, 5)]
    assert picked[0] == 1 and picked[-1] == 40 and len(picked) == 5
    assert picked == sorted(set(picked))
    assert _spread(entries[:3], 5) == entries[:3]
    assert [entry["epoch"] for entry in _spread(entries, 1)] == [40]


def test_tiles_are_separated_by_gray_lines() -> None:
    grid = tile(torch.zeros(3, 1, 2, 2), columns=2, pad=1)
    assert grid.shape == (1, 5, 5)
    assert grid[0, 2, 0] == 0.5 and grid[0, 0, 2] == 0.5 and grid[0, 0, 0] == 0.0
    assert grid[0, 3:, 3:].eq(0.5).all()  # the empty fourth cell


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": False}, "shows nothing"),
        ({"reconstructions": True}, "needs an image_batch"),
        ({"noise_shape": [0]}, "noise_shape must be a list of positive integers"),
        ({"value_range": (1.0, 0.0)}, "value_range must be two numbers low < high"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"folder": "a/b"}, "folder must be a plain folder name"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SampleGrid(**kwargs)


def test_a_missing_sampler_or_noise_shape_or_ema_is_refused_at_fit_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method 'generate'.*no attribute 'generate'"):
        fit(TinyGenerator(), [SampleGrid(method="generate")], tmp_path)
    with pytest.raises(ConfigError, match="no latent_shape or latent_dim: give noise_shape"):
        fit(TinyAutoencoder(), [SampleGrid(method="decoder")], tmp_path)
    with pytest.raises(ConfigError, match=r"SampleGrid\(ema=True\) needs an EMA callback"):
        fit(TinyGenerator(), [SampleGrid(ema=True)], tmp_path)

"""A model trained through ``from_pythae`` goes back to pythae: ``AutoModel.load_from_folder``
reads what ``export_to_pythae`` writes, and the loaded model computes what the trained one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("pythae")
pytest.importorskip("sklearn")

from pythae.models import VAE, AutoModel, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.models.normalizing_flows import NFModel

from engine import ConfigError
from strategies.pythae import export_to_pythae, from_pythae
from tests.compat.pythae_zoo import digits, float_state, make_data, make_model, training_config, zoo

ZOO = sorted(zoo())
ENGINE = {"output_dir": None, "max_steps": 2, "log_every": 1000}


def _outputs(model: nn.Module, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor output of one eval-mode forward, from the same random draws."""
    model.eval()
    torch.manual_seed(3)
    with torch.enable_grad():  # HVAE, RHVAE and RAE_GP need it
        if isinstance(model, NFModel):
            out = model.flow(data)
        else:
            out = model({"data": data}, epoch=1, dataset_size=len(data))
    return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_trained_model_loads_back_into_pythae_and_computes_the_same(
    name: str, tmp_path: Path
) -> None:
    data = make_data(name, 32)
    model = make_model(name)
    run = from_pythae(model, training_config(model, tmp_path / "pythae"), data, overrides=ENGINE)
    before = float_state(model)
    run.fit()
    assert any(not torch.equal(before[k], v) for k, v in float_state(model).items())
    folder = run.export(tmp_path / "exported")
    assert {"model_config.json", "model.pt", "environment.json"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = AutoModel.load_from_folder(str(folder))
    saved = model.flow if isinstance(model, NFModel) else model
    assert type(loaded) is type(saved)
    assert float_state(loaded).keys() == float_state(saved).keys()
    for key, value in float_state(saved).items():
        torch.testing.assert_close(float_state(loaded)[key], value, rtol=0, atol=0, msg=key)
    ours = _outputs(model, data[:8])
    theirs = _outputs(
        NFModel(model.prior, loaded) if isinstance(model, NFModel) else loaded, data[:8]
    )
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, msg=key)


class SmallEncoder(BaseEncoder):  # type: ignore[misc]  # pythae's base for custom networks
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.mean, self.log_var = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> Any:
        hidden = self.net(x)
        return ModelOutput(embedding=self.mean(hidden), log_covariance=self.log_var(hidden))


class SmallDecoder(BaseDecoder):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> Any:
        return ModelOutput(reconstruction=self.net(z).reshape(-1, 1, 8, 8))


def test_custom_networks_are_pickled_as_pythae_pickles_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = VAEConfig(input_dim=(1, 8, 8), latent_dim=2)
    model = VAE(config, encoder=SmallEncoder(), decoder=SmallDecoder())
    images = digits(32)
    run = from_pythae(model, training_config(model, tmp_path / "pythae"), images, overrides=ENGINE)
    run.fit()
    folder = export_to_pythae(model, tmp_path / "exported")
    assert {"encoder.pkl", "decoder.pkl"} <= {p.name for p in folder.iterdir()}
    loaded = AutoModel.load_from_folder(str(folder))
    assert type(loaded.encoder).__name__ == "SmallEncoder"
    for key, value in _outputs(model, images[:8]).items():
        torch.testing.assert_close(_outputs(loaded, images[:8])[key], value, msg=key)


def test_export_takes_the_weights_of_an_engine_checkpoint(tmp_path: Path) -> None:
    model = make_model("VAE")
    images = digits(32)
    config = training_config(model, tmp_path / "runs", epochs=2)
    config.steps_saving = 1
    run = from_pythae(model, config, images, overrides={"log_every": 1000, "run_name": "vae"})
    result = run.fit()
    trained = float_state(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    folder = export_to_pythae(model, tmp_path / "exported", checkpoint=result.run_dir)
    loaded = AutoModel.load_from_folder(str(folder))
    for key, value in trained.items():
        torch.testing.assert_close(float_state(loaded)[key], value, rtol=0, atol=0, msg=key)


def test_a_second_export_replaces_the_first_and_leaves_no_staging_folder(tmp_path: Path) -> None:
    model = make_model("AE")
    export_to_pythae(model, tmp_path / "exported")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    export_to_pythae(model, tmp_path / "exported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    loaded = AutoModel.load_from_folder(str(tmp_path / "exported"))
    torch.testing.assert_close(next(loaded.parameters()), next(model.parameters()))


def test_export_refuses_what_pythae_can_not_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Linear is not a pythae model"):
        export_to_pythae(nn.Linear(2, 2), tmp_path / "exported")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        export_to_pythae(make_model("AE"), tmp_path / "file")

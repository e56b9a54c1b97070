"""``load_from_json`` reads the files pythae writes (a model config, a training config, a saved
model folder) and refuses files that are missing or not pythae's, naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pythae")
pytest.importorskip("sklearn")

from pythae.models.normalizing_flows import NFModel
from pythae.trainers import CoupledOptimizerAdversarialTrainerConfig

from engine import ConfigError
from strategies.pythae import export_to_pythae, load_from_json
from tests.compat.pythae_zoo import digits, float_state, make_data, make_model


def _save(config: object, folder: Path, name: str) -> Path:
    config.save_json(str(folder), name)  # type: ignore[attr-defined]  # pythae's own writer
    return folder / f"{name}.json"


@pytest.mark.parametrize("name", ["VAE", "VAEGAN", "MAF", "PixelCNN"])
def test_a_model_config_and_a_training_config_as_pythae_writes_them(
    name: str, tmp_path: Path
) -> None:
    model = make_model(name)
    pythae_model = model.flow if isinstance(model, NFModel) else model
    model_path = _save(pythae_model.model_config, tmp_path, "model_config")
    training = CoupledOptimizerAdversarialTrainerConfig(num_epochs=1, seed=3)
    training_path = _save(training, tmp_path, "training_config") if name == "VAEGAN" else None
    setup = load_from_json(model_path, training_path)
    assert type(setup.model) is type(model)
    built = setup.model.flow if isinstance(setup.model, NFModel) else setup.model
    assert built.model_config == pythae_model.model_config
    assert setup.training_config == (training if training_path else None)
    again = load_from_json(model_path, training_path)
    for key, value in float_state(setup.model).items():  # seeded: the files fix the weights
        assert torch.equal(float_state(again.model)[key], value), key
    data = make_data(name, 16)
    history = setup.run(data, overrides={"output_dir": None, "epochs": 1}).fit().history
    assert len(history) == 1


def test_a_saved_model_folder_loads_the_trained_model(tmp_path: Path) -> None:
    model = make_model("VAE", seed=4)
    export_to_pythae(model, tmp_path / "trained")
    setup = load_from_json(tmp_path / "trained")
    for key, value in float_state(model).items():
        assert torch.equal(float_state(setup.model)[key], value), key
    setup.run(digits(16), overrides={"output_dir": None, "epochs": 1}).fit()


def test_missing_and_foreign_files_are_refused_naming_them(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    export_to_pythae(make_model("AE"), folder)
    (folder / "model_config.json").unlink()
    with pytest.raises(ConfigError, match=r"model folder '.*model' has no model_config\.json"):
        load_from_json(folder)
    with pytest.raises(ConfigError, match=r"model config '.*absent\.json' does not exist"):
        load_from_json(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text(json.dumps({"name": "ResNetConfig"}))
    with pytest.raises(ConfigError, match="names 'ResNetConfig', which is no pythae model"):
        load_from_json(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"can not read model config '.*broken\.json'"):
        load_from_json(tmp_path / "broken.json")
    model_path = _save(make_model("AE").model_config, tmp_path, "model_config")
    (tmp_path / "training.json").write_text(json.dumps({"name": "VAEConfig"}))
    with pytest.raises(ConfigError, match=r"training config .* names 'VAEConfig'; expected one of"):
        load_from_json(model_path, tmp_path / "training.json")
    (tmp_path / "typo.json").write_text(json.dumps({"name": "BaseTrainerConfig", "num_epoch": 2}))
    with pytest.raises(ConfigError, match=r"field\(s\) \['num_epoch'\] that BaseTrainerConfig"):
        load_from_json(model_path, tmp_path / "typo.json")
    (tmp_path / "plain.json").write_text(json.dumps({"latent_dim": 2}))
    with pytest.raises(ConfigError, match="is not a pythae config: it needs a 'name'"):
        load_from_json(tmp_path / "plain.json")


def test_a_config_that_says_its_networks_are_custom_needs_the_model_folder(tmp_path: Path) -> None:
    config = make_model("VAE").model_config
    config.uses_default_encoder = False
    with pytest.raises(ConfigError, match="its encoder is a custom network"):
        load_from_json(_save(config, tmp_path, "model_config"))

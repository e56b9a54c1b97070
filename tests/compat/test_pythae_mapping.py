"""pythae's training configs become the engine's settings: the trainer as ``TrainingPipeline``
picks it, every field mapped (or documented as not), bad pairs refused with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("pythae")
pytest.importorskip("sklearn")

from pythae import trainers
from pythae.models import VAE, VAEConfig
from pythae.pipelines import TrainingPipeline

from callbacks import Checkpointing
from engine import ConfigError, OptimizerSpec, SchedulerSpec
from strategies import Adversarial, Coupled, CoupledAdversarial, Standard
from strategies.pythae import SharedGraphUpdates, check_pythae_version, from_pythae, mapping
from tests.compat.pythae_zoo import (
    digits,
    float_state,
    make_data,
    make_model,
    training_config,
    zoo,
)

CONFIG_CLASSES = [
    trainers.BaseTrainerConfig,
    trainers.AdversarialTrainerConfig,
    trainers.CoupledOptimizerTrainerConfig,
    trainers.CoupledOptimizerAdversarialTrainerConfig,
]
ZOO = sorted(zoo())
ENGINE = {"output_dir": None}


def test_the_mapping_names_every_field_of_every_training_config() -> None:
    documented = mapping.__doc__ or ""
    prefixes = ("autoencoder_", "discriminator_", "encoder_", "decoder_")
    for config_class in CONFIG_CLASSES:
        for field in dataclasses.fields(config_class):
            name = field.name
            for prefix in prefixes:
                if name.startswith(prefix):
                    name = "<p>" + name[len(prefix) :]
            assert f"``{name}``" in documented, (config_class.__name__, field.name)


@pytest.mark.parametrize("name", ZOO)
def test_the_trainer_is_the_one_training_pipeline_picks(name: str) -> None:
    model = make_model(name)
    layout, _ = mapping.choose_trainer(model, None)
    pipeline = TrainingPipeline(model, None)
    assert layout.config_class == type(pipeline.training_config).__name__
    for config_class in CONFIG_CLASSES:
        try:
            TrainingPipeline(model, config_class())
            pipeline_refuses = False
        except AssertionError:
            pipeline_refuses = True
        if pipeline_refuses:
            with pytest.raises(ConfigError, match=f"{name}.*{config_class.__name__}"):
                mapping.choose_trainer(model, config_class())


def test_a_multi_optimizer_config_for_a_single_loss_model_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"AdversarialTrainer .*can not train a VAE"):
        from_pythae(make_model("VAE"), trainers.AdversarialTrainerConfig(), digits(8))
    with pytest.raises(ConfigError, match="pythae trains a VAEGAN with a CoupledOptimizerAdv"):
        from_pythae(make_model("VAEGAN"), trainers.BaseTrainerConfig(), digits(8))


class CustomCoupled(nn.Module):
    """A user's own model (not from pythae's zoo) without a ``decoder`` submodule."""

    model_name = "CustomCoupled"

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.model_config = VAEConfig(input_dim=(4,))


def test_a_model_without_the_submodules_its_trainer_optimises_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"optimises model\.decoder, which CustomCoupled"):
        from_pythae(CustomCoupled(), trainers.CoupledOptimizerTrainerConfig(), torch.ones(8, 4))


def _every_field_set(config_class: type, output_dir: Path) -> Any:
    """A config of ``config_class`` with every mapped field away from its default."""
    config = config_class(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=4,
        num_epochs=3,
        train_dataloader_num_workers=2,
        seed=11,
        no_cuda=True,
        steps_saving=2,
        keep_best_on_train=True,
    )
    prefixes = {
        "BaseTrainerConfig": [""],
        "AdversarialTrainerConfig": ["autoencoder_", "discriminator_"],
        "CoupledOptimizerTrainerConfig": ["encoder_", "decoder_"],
        "CoupledOptimizerAdversarialTrainerConfig": ["encoder_", "decoder_", "discriminator_"],
    }[config_class.__name__]
    for index, prefix in enumerate(prefixes):
        setattr(config, f"{prefix}optimizer_cls", "SGD")
        setattr(config, f"{prefix}learning_rate", 0.01 * (index + 1))
        setattr(config, f"{prefix}optimizer_params", {"momentum": 0.5})
        setattr(config, f"{prefix}scheduler_cls", "StepLR")
        setattr(config, f"{prefix}scheduler_params", {"step_size": 2 + index})
    return config


@pytest.mark.parametrize(
    ("model_name", "strategy_class", "roles"),
    [
        ("VAE", Standard, {"model": ""}),
        ("Adversarial_AE", Adversarial, {"generator": "", "discriminator": ""}),
        ("RAE_GP", Standard, {"model": ""}),
        ("PIWAE", Coupled, {"encoder": "", "decoder": ""}),
        ("VAEGAN", CoupledAdversarial, {"encoder": "", "decoder": "", "discriminator": ""}),
    ],
)
def test_every_mapped_field_reaches_the_engine(
    model_name: str, strategy_class: type, roles: dict[str, str], tmp_path: Path
) -> None:
    model = make_model(model_name)
    config_class = type(training_config(model, tmp_path))
    config = _every_field_set(config_class, tmp_path)
    run = from_pythae(model, config, make_data(model_name, 16), make_data(model_name, 8))
    engine = run.engine.config
    assert (engine.epochs, engine.batch_size, engine.eval_batch_size) == (3, 8, 4)
    assert (engine.num_workers, engine.seed, engine.device) == (2, 11, "cpu")
    assert (engine.shuffle, engine.drop_last, engine.eval_every) == (True, False, 1)
    assert engine.output_dir == tmp_path and engine.precision == "fp32"
    assert engine.monitor == f"train/{mapping.LAYOUTS[config_class.__name__].loss_keys[0]}"
    assert engine.eval_with_grad == (model_name == "RAE_GP")
    assert [c.every_n_epochs for c in run.engine.callbacks if isinstance(c, Checkpointing)] == [2]
    strategy = run.engine.strategy
    assert type(strategy) is strategy_class
    for index, role in enumerate(roles):
        optimizer, scheduler = _role(strategy, role)
        assert optimizer == OptimizerSpec("SGD", lr=0.01 * (index + 1), momentum=0.5, foreach=None)
        assert scheduler == SchedulerSpec("StepLR", interval="epoch", step_size=2 + index)


def _role(strategy: Any, role: str) -> tuple[OptimizerSpec, SchedulerSpec | None]:
    if isinstance(strategy, Standard):
        return strategy.optimizer, strategy.scheduler
    return getattr(strategy, role), getattr(strategy, f"{role}_scheduler")


def test_pythae_updates_build_shared_graph_updates_in_pythaes_backward_order() -> None:
    model = make_model("VAEGAN")
    run = from_pythae(model, None, digits(8), updates="pythae", overrides=ENGINE)
    strategy = run.engine.strategy
    assert isinstance(strategy, SharedGraphUpdates)
    assert list(strategy.roles) == ["encoder", "decoder", "discriminator"]
    assert strategy.loss_keys == ("encoder_loss", "decoder_loss", "discriminator_loss")
    single = from_pythae(make_model("VAE"), None, digits(8), updates="pythae", overrides=ENGINE)
    assert isinstance(single.engine.strategy, Standard)


@pytest.mark.parametrize(("has_eval", "prefix"), [(True, "eval"), (False, "train")])
def test_a_plateau_scheduler_watches_the_roles_loss_as_pythae_feeds_it(
    has_eval: bool, prefix: str
) -> None:
    config = trainers.AdversarialTrainerConfig(
        autoencoder_scheduler_cls="ReduceLROnPlateau",
        discriminator_scheduler_cls="ReduceLROnPlateau",
    )
    images = digits(16)
    run = from_pythae(
        make_model("Adversarial_AE"), config, images, images if has_eval else None, overrides=ENGINE
    )
    strategy = run.engine.strategy
    assert strategy.generator_scheduler.monitor == f"{prefix}/autoencoder_loss"
    assert strategy.discriminator_scheduler.monitor == f"{prefix}/discriminator_loss"


def test_amp_is_fp16_on_cuda_except_for_a_bce_reconstruction() -> None:
    amp = trainers.BaseTrainerConfig(amp=True)
    mse = make_model("VAE")
    bce = VAE(VAEConfig(input_dim=(1, 8, 8), latent_dim=2, reconstruction_loss="bce"))
    assert mapping.precision(amp, mse, "cuda") == "fp16"
    assert mapping.precision(amp, bce, "cuda") == "fp32"
    assert mapping.precision(amp, mse, "cpu") == "fp32"
    assert mapping.precision(trainers.BaseTrainerConfig(), mse, "cuda") == "fp32"


def test_rae_l2_gets_the_pipelines_decoder_weight_decay_and_the_callers_config_is_kept() -> None:
    """Only from a given config: pythae's default one loses it (see strategies.pythae.mapping)."""
    default = from_pythae(make_model("RAE_L2", reg_weight=0.25), None, digits(8), overrides=ENGINE)
    pipeline = TrainingPipeline(make_model("RAE_L2", reg_weight=0.25), None)
    assert pipeline.training_config.decoder_optimizer_params is None
    assert "weight_decay" not in default.engine.strategy.decoder.params
    model = make_model("RAE_L2", reg_weight=0.25)
    config = trainers.CoupledOptimizerTrainerConfig(decoder_optimizer_params={"betas": (0.8, 0.9)})
    run = from_pythae(model, config, digits(8), overrides=ENGINE)
    decoder = run.engine.strategy.decoder
    assert dict(decoder.params) == {
        "lr": 1e-4,
        "betas": (0.8, 0.9),
        "weight_decay": 0.25,
        "foreach": None,
    }
    assert config.decoder_optimizer_params == {"betas": (0.8, 0.9)}
    assert run.training_config.decoder_optimizer_params["weight_decay"] == 0.25


def test_bad_input_is_refused_naming_the_value(tmp_path: Path) -> None:
    images = digits(8)
    with pytest.raises(ConfigError, match=r"pythae version '0\.1\.1' is not supported"):
        check_pythae_version("0.1.1")
    assert check_pythae_version() == "0.1.2"
    with pytest.raises(ConfigError, match=r"updates must be one of .*'shared'"):
        from_pythae(make_model("VAEGAN"), None, images, updates="shared")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown engine config override\(s\) \['epoch'\]"):
        from_pythae(make_model("VAE"), None, images, overrides={"epoch": 3})
    with pytest.raises(ConfigError, match="eval_every=2: pythae evaluates after every epoch"):
        from_pythae(make_model("VAE"), None, images, images, overrides={"eval_every": 2})
    config = trainers.BaseTrainerConfig(steps_saving=1)
    with pytest.raises(ConfigError, match="steps_saving=1 saves checkpoints into output_dir"):
        from_pythae(make_model("VAE"), config, images)
    with pytest.raises(ConfigError, match="training_config must be one of pythae's"):
        from_pythae(make_model("VAE"), {"num_epochs": 3}, images)
    with pytest.raises(ConfigError, match=r"train_data must be .* got list"):
        from_pythae(make_model("VAE"), None, [[0.0]])
    with pytest.raises(ConfigError, match="Linear is not a pythae model"):
        from_pythae(nn.Linear(2, 2), None, images)


def test_flows_train_inside_nf_model_and_made_not_at_all() -> None:
    from pythae.models.normalizing_flows import MADE, MADEConfig, NFModel

    flow = make_model("MAF").flow
    with pytest.raises(ConfigError, match="a MAF flow trains inside NFModel"):
        from_pythae(flow, None, make_data("MAF", 8))
    made = MADE(MADEConfig(input_dim=(8,), output_dim=(8,)))
    prior = torch.distributions.MultivariateNormal(torch.zeros(8), torch.eye(8))
    for model in (made, NFModel(prior, made)):
        with pytest.raises(ConfigError, match="pythae can not train MADE"):
            from_pythae(model, None, make_data("MAF", 8))


def test_arrays_tensors_and_pythae_datasets_are_taken_as_pythaes_pipeline_takes_them() -> None:
    """An array trains exactly as the tensor it holds; a pythae ``BaseDataset`` goes through a
    DataLoader (whose iterator draws a seed from the global RNG each epoch, so its random draws
    differ) and trains on the same batches."""
    from pythae.data.preprocessors import DataProcessor

    images = digits(40)
    processor = DataProcessor()
    dataset = processor.to_dataset(processor.process_data(images))
    results = []
    for data in (images, images.numpy(), dataset):
        model = make_model("VAE")
        run = from_pythae(model, None, data, overrides={"output_dir": None, "epochs": 3})
        assert run.forward.train_size == 40
        history = run.fit().history
        assert history[-1]["train/loss"] < history[0]["train/loss"]
        results.append((history[-1]["train/loss"], float_state(model)))
    loss, state = results[1]
    assert loss == results[0][0]
    for key, value in state.items():
        assert torch.equal(value, results[0][1][key]), key

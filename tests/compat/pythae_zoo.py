"""pythae's whole zoo for the compat tests: every model class it exports, small data for each,
and pythae's own trainer fed exactly the batches the engine gets.

The zoo is read from the package (``strategies.pythae.files.model_classes``), not listed by
hand. MADE is left out: pythae can not train it (its forward returns ``mu`` and ``log_var``, no
loss). A normalizing flow trains inside ``NFModel`` with a standard normal prior, as pythae's
trainers take flows; PixelCNN trains as it is.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from strategies.pythae.files import in_nf_model, model_classes
from strategies.pythae.mapping import REQUIRED_CONFIG, default_training_config

EXCLUDED = {"MADE": "pythae can not train it: its forward returns mu and log_var, no loss"}

# Smaller than the defaults only to keep the tests fast on two cores.
SETTINGS: dict[str, dict[str, Any]] = {
    "PixelCNN": {"n_embeddings": 17, "n_layers": 2, "kernel_size": 3},
    "RHVAE": {"n_lf": 1},
    "HVAE": {"n_lf": 1},
    "VQVAE": {"num_embeddings": 16},
    "VAE_IAF": {"hidden_size": 32},
    "MAF": {"hidden_size": 32},
    "IAF": {"hidden_size": 32},
}
FLOW_FEATURES = 8
LEARNING_RATE_FIELDS = (
    "learning_rate",
    "autoencoder_learning_rate",
    "discriminator_learning_rate",
    "encoder_learning_rate",
    "decoder_learning_rate",
)


def zoo() -> dict[str, type]:
    """Every model class pythae exports, by name, MADE excepted."""
    classes = {cls.__name__: cls for cls in model_classes().values()}
    return {name: cls for name, cls in sorted(classes.items()) if name not in EXCLUDED}


def _config_class(name: str) -> type:
    return next(config for config, cls in model_classes().items() if cls.__name__ == name)


def _is_flow(name: str) -> bool:
    from pythae.models.normalizing_flows import BaseNF

    return issubclass(zoo()[name], BaseNF) and name != "PixelCNN"


def config_class(name: str) -> Any:
    from pythae import models
    from pythae.models import normalizing_flows

    config_name = _config_class(name)
    return getattr(models, config_name, None) or getattr(normalizing_flows, config_name)


def make_model(name: str, seed: int = 0, **settings: Any) -> torch.nn.Module:
    """A small ``name`` (a flow inside ``NFModel``), its weights drawn after ``seed``."""
    config_cls = config_class(name)
    values: dict[str, Any] = {"input_dim": (FLOW_FEATURES,) if _is_flow(name) else (1, 8, 8)}
    if "latent_dim" in inspect.signature(config_cls).parameters:
        values["latent_dim"] = 2
    values.update(SETTINGS.get(name, {}))
    values.update(settings)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return in_nf_model(zoo()[name](config_cls(**values)))


def digits(count: int) -> torch.Tensor:
    """``count`` 8x8 digit images in [0, 1], shaped (count, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:count], dtype=torch.float32) / 16.0
    return images.unsqueeze(1)


def make_data(name: str, count: int) -> torch.Tensor:
    """What ``name`` models: digit images; for PixelCNN their 17 grey levels as categories;
    for a flow one row of each image (8 features)."""
    images = digits(count)
    if name == "PixelCNN":
        return (images * 16).round()
    if _is_flow(name):
        return images.flatten(1)[:, 2 * FLOW_FEATURES : 3 * FLOW_FEATURES]
    return images


def training_config(
    model: torch.nn.Module, output_dir: Path, epochs: int = 2, batch_size: int = 16
) -> Any:
    """The config a pythae user gives ``model`` (the one ``TrainingPipeline`` requires of it,
    else its default), with every learning rate at 1e-3, on the CPU, writing into
    ``output_dir``."""
    from pythae import trainers

    required = REQUIRED_CONFIG.get(model.model_name)
    config = default_training_config(model) if required is None else getattr(trainers, required)()
    for field in LEARNING_RATE_FIELDS:
        if hasattr(config, field):
            setattr(config, field, 1e-3)
    config.num_epochs = epochs
    config.per_device_train_batch_size = batch_size
    config.per_device_eval_batch_size = batch_size
    config.output_dir = str(output_dir)
    config.no_cuda = True
    return config


def trainer_class(config: Any) -> type:
    """The trainer ``TrainingPipeline.__call__`` builds for ``config`` (its isinstance order)."""
    from pythae import trainers

    for config_cls, trainer_cls in (
        (trainers.CoupledOptimizerTrainerConfig, trainers.CoupledOptimizerTrainer),
        (trainers.AdversarialTrainerConfig, trainers.AdversarialTrainer),
        (
            trainers.CoupledOptimizerAdversarialTrainerConfig,
            trainers.CoupledOptimizerAdversarialTrainer,
        ),
        (trainers.BaseTrainerConfig, trainers.BaseTrainer),
    ):
        if isinstance(config, config_cls):
            return trainer_cls
    raise TypeError(f"no pythae trainer for {type(config).__name__}")


def _loader(dataset: Any, batch_size: int) -> DataLoader[Any]:
    """In order, and drawing nothing from the global RNG (a DataLoader without its own
    generator draws a seed from it at every epoch): the engine's ``shuffle=False`` batches."""
    from pythae.data.datasets import collate_dataset_output

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_dataset_output,
        generator=torch.Generator(),
    )


def epoch_log() -> Any:
    """A pythae training callback keeping what its trainer logs after each epoch
    (``train_epoch_loss``, ``train_<loss key>``...) in ``.logs``, one dict per epoch."""
    from pythae.trainers.training_callbacks import TrainingCallback

    class EpochLog(TrainingCallback):  # type: ignore[misc]  # pythae's callback class
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, training_config: Any, logs: dict[str, float], **kwargs: Any) -> None:
            self.logs.append(dict(logs))

    return EpochLog()


def pythae_losses(logs: dict[str, float], loss_keys: tuple[str, ...]) -> dict[str, float]:
    """One epoch of pythae's log by the engine's loss keys: ``loss`` is pythae's
    ``train_epoch_loss``, any other key ``k`` its ``train_k``."""
    return {key: logs["train_epoch_loss" if key == "loss" else f"train_{key}"] for key in loss_keys}


def pythae_trainer(
    model: torch.nn.Module,
    config: Any,
    train: torch.Tensor,
    eval: torch.Tensor | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """pythae's own trainer for ``model`` as ``TrainingPipeline`` would build it (the
    pipeline's config checks and RAE_L2 weight decay applied to a copy of ``config``), its
    loaders replaced by in-order ones. Its constructor runs pythae's sanity-check forward on
    the first batch, which moves buffers (VQVAE's EMA codebook): copy ``trainer.model`` after
    this, not before."""
    from pythae.data.preprocessors import DataProcessor
    from pythae.pipelines import TrainingPipeline

    pipeline = TrainingPipeline(model, copy.deepcopy(config))
    processor = DataProcessor()
    train_set = processor.to_dataset(processor.process_data(train))
    eval_set = None if eval is None else processor.to_dataset(processor.process_data(eval))
    settings = pipeline.training_config
    trainer = trainer_class(settings)(
        model=model,
        train_dataset=train_set,
        eval_dataset=eval_set,
        training_config=settings,
        callbacks=callbacks,
    )
    trainer.train_loader = _loader(train_set, settings.per_device_train_batch_size)
    if eval_set is not None:
        trainer.eval_loader = _loader(eval_set, settings.per_device_eval_batch_size)
    return trainer


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point entry of the state dict (parameters and buffers), detached."""
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    }

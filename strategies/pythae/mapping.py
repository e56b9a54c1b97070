"""pythae's training configs in engine terms: which trainer, which strategy, which settings.

The trainer is chosen as pythae 0.1.2's ``TrainingPipeline`` chooses it: by the training
config's class, after the pipeline's own checks. Given a config, RAE_L2 and PIWAE need a
``CoupledOptimizerTrainerConfig``, Adversarial_AE and FactorVAE an ``AdversarialTrainerConfig``
and VAEGAN a ``CoupledOptimizerAdversarialTrainerConfig``, and RAE_L2's decoder weight decay is
set to the model's ``reg_weight``. Given none, RAE_L2, Adversarial_AE, FactorVAE and VAEGAN get
those configs' defaults and every other model, PIWAE included, a ``BaseTrainerConfig`` (PIWAE
then trains on its ``loss`` with one optimiser); RAE_L2's default gets no weight decay, as in
pythae (its pipeline passes ``decoder_optim_decay``, a keyword the config silently ignores).
A pythae model whose trainer pythae would not run (a zoo model other than those five under a
multi-optimiser config, a model missing the submodules a trainer optimises) is refused with a
``ConfigError`` naming the config and the model.

Every field of pythae's four training configs, and what it becomes. ``<p>`` is the role's field
prefix: none for ``BaseTrainerConfig`` (role ``model``), ``autoencoder_`` and
``discriminator_`` for ``AdversarialTrainerConfig`` (roles ``generator`` = ``model.encoder`` +
``model.decoder``, ``discriminator``), ``encoder_`` and ``decoder_`` for
``CoupledOptimizerTrainerConfig``, ``encoder_``, ``decoder_`` and ``discriminator_`` for
``CoupledOptimizerAdversarialTrainerConfig`` (roles ``encoder``, ``decoder``,
``discriminator``: the submodules of those names).

==================================  ===========================================================
pythae field                        engine
==================================  ===========================================================
``name``                            the config's class: picks the trainer, hence the strategy
                                    (``Standard``, ``Adversarial``, ``Coupled``,
                                    ``CoupledAdversarial``; ``SharedGraphUpdates`` for the
                                    multi-optimiser ones under ``updates="pythae"``)
``<p>optimizer_cls``                the role's ``OptimizerSpec(<p>optimizer_cls, ...)``
``<p>learning_rate``                ``lr=`` of that spec
``<p>optimizer_params``             the spec's other keyword arguments, and ``foreach=None``
                                    unless they name ``fused`` or ``foreach``: torch picks the
                                    kernel it picks for pythae (the engine otherwise prefers a
                                    fused one, whose rounding differs)
``<p>scheduler_cls``                the role's ``SchedulerSpec(<p>scheduler_cls, interval=
                                    "epoch", ...)``: stepped once per epoch after evaluation, as
                                    pythae; ``ReduceLROnPlateau`` gets ``monitor="eval/<loss>"``
                                    (``"train/<loss>"`` without eval data), the role's loss as
                                    pythae feeds it (pythae averages per batch, the engine per
                                    sample: equal unless the last batch is short)
``<p>scheduler_params``             that spec's keyword arguments
``optimizer_cls``, ``learning_rate``,  under the three multi-optimiser configs: unused, as by
``optimizer_params``,               pythae's trainers (each role has its own fields)
``scheduler_cls``,
``scheduler_params``
``num_epochs``                      ``EngineConfig(epochs=)``; ``forward`` gets ``epoch``
                                    counted from 1
``per_device_train_batch_size``     ``EngineConfig(batch_size=)`` (per process, as pythae)
``per_device_eval_batch_size``      ``EngineConfig(eval_batch_size=)``
``train_dataloader_num_workers``    ``EngineConfig(num_workers=)`` (only a ``Dataset`` is
                                    loaded by workers; tensors are sliced in memory)
``eval_dataloader_num_workers``     not mapped: the engine loads evaluation data with the
                                    training ``num_workers``
``seed``                            ``EngineConfig(seed=)``: the same seeding (python, numpy,
                                    torch) before the first batch; under several processes the
                                    engine seeds rank r with ``seed + r`` (pythae: all ``seed``)
``no_cuda``                         ``EngineConfig(device="cpu")``; otherwise ``"cuda"`` where
                                    CUDA is available, else ``"cpu"``, as pythae
``amp``                             ``EngineConfig(precision="fp16")`` on CUDA (pythae:
                                    ``torch.autocast("cuda")``, fp16), except for a model whose
                                    ``reconstruction_loss`` is ``"bce"`` (pythae turns amp off
                                    there); ``"fp32"`` on the CPU, where pythae's autocast does
                                    nothing. The engine adds a GradScaler, pythae has none
``output_dir``                      ``EngineConfig(output_dir=)``; ``None`` writes no files
                                    (pythae writes ``dummy_output_dir``)
``steps_saving``                    ``callbacks.Checkpointing(every_n_epochs=steps_saving)``;
                                    needs ``output_dir``
``steps_predict``                   not mapped: it only feeds pythae's own logging callbacks
                                    (``on_prediction_step``), which the engine does not run
``keep_best_on_train``              ``EngineConfig(monitor="train/<first loss>")`` (the best
                                    epoch is tracked on the training loss; pythae keeps a copy
                                    of that model, the engine's checkpointing keeps its
                                    checkpoint); pythae's multi-optimiser trainers rank epochs
                                    by the sum of their losses, the engine by the first loss
``world_size``, ``local_rank``,     not mapped: pythae reads them from ``torchrun``'s
``rank``, ``master_addr``,          environment, and so does the engine
``master_port``
``dist_backend``                    not mapped: the engine uses nccl on CUDA and gloo on the CPU
==================================  ===========================================================

What pythae's ``BaseTrainer`` does beyond its config, and where the engine does it: ``epoch``,
``dataset_size`` (the training set's size in training, the evaluation set's during evaluation)
and ``uses_ddp`` passed to ``forward`` (``strategies/pythae/forward.py``); ``model.update()``
after each epoch's last training batch, before its evaluation; ``model.device`` set to the run's
device; evaluation with gradients for models whose loss calls ``torch.autograd.grad``
(``EVAL_NEEDS_GRAD``), where pythae catches the error and reruns the batch with gradients on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch

from engine.config.engine_config import EngineConfig
from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.errors import ConfigError
from engine.protocols import StepStrategy
from strategies.adversarial import Adversarial
from strategies.coupled import Coupled
from strategies.coupled_adversarial import CoupledAdversarial
from strategies.joint import RoleFields
from strategies.pythae.shared_graph import SharedGraphUpdates
from strategies.standard import Standard

Updates = Literal["isolated", "pythae"]
UPDATES = ("isolated", "pythae")

# Models whose loss calls torch.autograd.grad (HVAE and RHVAE: leapfrog steps; RAE_GP: a
# gradient penalty): they evaluate with gradients on, as pythae reruns them after its no_grad
# attempt fails. tests/compat/test_pythae_zoo.py checks this set against the whole zoo.
EVAL_NEEDS_GRAD = frozenset({"HVAE", "RHVAE", "RAE_GP"})

BASE = "BaseTrainerConfig"
ADVERSARIAL = "AdversarialTrainerConfig"
COUPLED = "CoupledOptimizerTrainerConfig"
COUPLED_ADVERSARIAL = "CoupledOptimizerAdversarialTrainerConfig"

# The training config TrainingPipeline builds for these zoo models when given none (others:
# BaseTrainerConfig, PIWAE included), and the one it requires of these when given one.
DEFAULT_CONFIG = {
    "RAE_L2": COUPLED,
    "Adversarial_AE": ADVERSARIAL,
    "FactorVAE": ADVERSARIAL,
    "VAEGAN": COUPLED_ADVERSARIAL,
}
REQUIRED_CONFIG = {
    "RAE_L2": COUPLED,
    "PIWAE": COUPLED,
    "Adversarial_AE": ADVERSARIAL,
    "FactorVAE": ADVERSARIAL,
    "VAEGAN": COUPLED_ADVERSARIAL,
}


@attrs.frozen
class RoleLayout:
    """One optimiser of a pythae trainer: our role name, the config's field prefix, the loss
    it steps on and the model attributes whose parameters it holds (``()``: all of them)."""

    role: str
    prefix: str
    loss_key: str
    modules: tuple[str, ...]


@attrs.frozen
class TrainerLayout:
    """A pythae trainer: its name and its optimisers in the order it back-propagates them."""

    trainer: str
    config_class: str
    roles: tuple[RoleLayout, ...]

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return tuple(role.loss_key for role in self.roles)

    @property
    def is_multi_optimizer(self) -> bool:
        return len(self.roles) > 1


_ENCODER = RoleLayout("encoder", "encoder_", "encoder_loss", ("encoder",))
_DECODER = RoleLayout("decoder", "decoder_", "decoder_loss", ("decoder",))
_DISCRIMINATOR = RoleLayout(
    "discriminator", "discriminator_", "discriminator_loss", ("discriminator",)
)
LAYOUTS = {
    BASE: TrainerLayout("BaseTrainer", BASE, (RoleLayout("model", "", "loss", ()),)),
    ADVERSARIAL: TrainerLayout(
        "AdversarialTrainer",
        ADVERSARIAL,
        (
            RoleLayout("generator", "autoencoder_", "autoencoder_loss", ("encoder", "decoder")),
            _DISCRIMINATOR,
        ),
    ),
    COUPLED: TrainerLayout("CoupledOptimizerTrainer", COUPLED, (_ENCODER, _DECODER)),
    COUPLED_ADVERSARIAL: TrainerLayout(
        "CoupledOptimizerAdversarialTrainer",
        COUPLED_ADVERSARIAL,
        (_ENCODER, _DECODER, _DISCRIMINATOR),
    ),
}


def model_name(model: torch.nn.Module) -> str:
    """pythae's ``model_name`` of ``model`` (a flow inside ``NFModel``: the flow's)."""
    name = getattr(model, "model_name", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"model {type(model).__name__} is not a pythae model: it has no model_name; pass a "
            "pythae.models model (a flow wrapped as NFModel(prior, flow))"
        )
    return name


def _trainer_config_classes() -> dict[str, type]:
    from pythae import trainers

    return {name: getattr(trainers, name) for name in LAYOUTS}


def default_training_config(model: torch.nn.Module) -> Any:
    """The config ``TrainingPipeline`` builds when it is given none."""
    classes = _trainer_config_classes()
    return classes[DEFAULT_CONFIG.get(model_name(model), BASE)]()


def _config_class_name(training_config: Any) -> str:
    """The most derived of pythae's four trainer config classes that ``training_config`` is,
    checked in ``TrainingPipeline``'s order."""
    classes = _trainer_config_classes()
    for name in (COUPLED, ADVERSARIAL, COUPLED_ADVERSARIAL, BASE):
        if isinstance(training_config, classes[name]):
            return name
    raise ConfigError(
        f"training_config must be one of pythae's {list(LAYOUTS)}, "
        f"got {type(training_config).__name__}"
    )


def choose_trainer(model: torch.nn.Module, training_config: Any) -> tuple[TrainerLayout, Any]:
    """pythae's trainer for ``model`` under ``training_config`` (None: the pipeline's default),
    and the config as the pipeline would use it (a copy: the caller's is left as it is)."""
    name = model_name(model)
    if training_config is None:
        config = default_training_config(model)
    else:
        config = copy.deepcopy(training_config)
    class_name = _config_class_name(config)
    required = None if training_config is None else REQUIRED_CONFIG.get(name)
    if required is not None and class_name != required:
        raise ConfigError(
            f"pythae trains a {name} with a {required} ({LAYOUTS[required].trainer}); "
            f"training_config is a {type(training_config).__name__}"
        )
    if name not in REQUIRED_CONFIG and class_name != BASE and _is_zoo_model(model):
        raise ConfigError(
            f"pythae's {LAYOUTS[class_name].trainer} (training_config "
            f"{type(training_config).__name__}) can not train a {name}: its forward returns no "
            f"{' / '.join(LAYOUTS[class_name].loss_keys)}; use a {BASE}"
        )
    layout = LAYOUTS[class_name]
    missing = sorted(
        {module for role in layout.roles for module in role.modules} - _children(model)
    )
    if missing:
        raise ConfigError(
            f"pythae's {layout.trainer} (training_config {type(config).__name__}) optimises "
            f"model.{', model.'.join(missing)}, which {type(model).__name__} does not have"
        )
    if name == "RAE_L2" and training_config is not None:  # TrainingPipeline: reg_weight
        params = dict(config.decoder_optimizer_params or {})
        params["weight_decay"] = model.model_config.reg_weight  # type: ignore[union-attr]
        config.decoder_optimizer_params = params
    return layout, config


def _is_zoo_model(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("pythae.")


def _children(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_children()}


def role_specs(
    layout: TrainerLayout, config: Any, has_eval: bool
) -> dict[str, tuple[OptimizerSpec, SchedulerSpec | None]]:
    """Each role's optimiser and scheduler from its ``<prefix>`` fields: the optimiser pythae
    builds, with torch's default kernel (``foreach=None``) unless the params choose one."""
    specs: dict[str, tuple[OptimizerSpec, SchedulerSpec | None]] = {}
    for role in layout.roles:
        p = role.prefix
        params = dict(getattr(config, f"{p}optimizer_params") or {})
        if "fused" not in params and "foreach" not in params:
            params["foreach"] = None  # torch's default kernel, as pythae builds it
        optimizer = OptimizerSpec(
            getattr(config, f"{p}optimizer_cls"), lr=getattr(config, f"{p}learning_rate"), **params
        )
        scheduler = None
        scheduler_cls = getattr(config, f"{p}scheduler_cls")
        if scheduler_cls is not None:
            scheduler_params = dict(getattr(config, f"{p}scheduler_params") or {})
            monitor = None
            if scheduler_cls == "ReduceLROnPlateau":
                monitor = f"{'eval' if has_eval else 'train'}/{role.loss_key}"
            scheduler = SchedulerSpec(
                scheduler_cls, interval="epoch", monitor=monitor, **scheduler_params
            )
        specs[role.role] = (optimizer, scheduler)
    return specs


def build_strategy(
    layout: TrainerLayout,
    specs: Mapping[str, tuple[OptimizerSpec, SchedulerSpec | None]],
    updates: Updates,
    metrics: tuple[str, ...] = (),
) -> StepStrategy:
    """The strategy that trains like ``layout``'s trainer: isolated updates, or pythae's own
    (``SharedGraphUpdates``; a single optimiser updates the same either way)."""
    if updates not in UPDATES:
        raise ConfigError(f"updates must be one of {list(UPDATES)}, got {updates!r}")
    if not layout.is_multi_optimizer:
        optimizer, scheduler = specs["model"]
        return Standard(optimizer, scheduler, loss_key="loss", metrics=metrics)
    groups = {role.role: role.modules for role in layout.roles}
    if updates == "pythae":
        roles = {role.role: RoleFields(*specs[role.role], role.loss_key) for role in layout.roles}
        return SharedGraphUpdates(roles, groups=groups, metrics=metrics)
    arguments: dict[str, Any] = {"groups": groups, "metrics": metrics}
    for role in layout.roles:
        arguments[role.role], arguments[f"{role.role}_scheduler"] = specs[role.role]
    strategy_class = {
        ADVERSARIAL: Adversarial,
        COUPLED: Coupled,
        COUPLED_ADVERSARIAL: CoupledAdversarial,
    }[layout.config_class]
    return strategy_class(**arguments)  # type: ignore[no-any-return]


def precision(config: Any, model: torch.nn.Module, device: str) -> str:
    """pythae's ``amp``: CUDA autocast in fp16, off for a BCE reconstruction loss."""
    bce = getattr(model.model_config, "reconstruction_loss", None) == "bce"
    return "fp16" if config.amp and device == "cuda" and not bce else "fp32"


def engine_config(
    config: Any,
    model: torch.nn.Module,
    layout: TrainerLayout,
    has_eval: bool,
    overrides: Mapping[str, Any],
) -> EngineConfig:
    """The ``EngineConfig`` of the fields above; ``overrides`` replace mapped values (e.g.
    ``{"shuffle": False}``), and may not change ``eval_every`` when evaluating (pythae
    evaluates after every epoch, and ``model.update()`` runs right before it)."""
    device = "cuda" if torch.cuda.is_available() and not config.no_cuda else "cpu"
    if config.steps_saving is not None and config.output_dir is None:
        raise ConfigError(
            f"steps_saving={config.steps_saving} saves checkpoints into output_dir, which is "
            "None (pythae would write into 'dummy_output_dir'); set output_dir"
        )
    values: dict[str, Any] = {
        "epochs": config.num_epochs,
        "batch_size": config.per_device_train_batch_size,
        "eval_batch_size": config.per_device_eval_batch_size,
        "shuffle": True,
        "drop_last": False,
        "seed": config.seed,
        "device": device,
        "precision": precision(config, model, device),
        "num_workers": config.train_dataloader_num_workers,
        "output_dir": config.output_dir,
        "eval_every": 1,
        "monitor": f"train/{layout.loss_keys[0]}" if config.keep_best_on_train else None,
        "eval_with_grad": model_name(model) in EVAL_NEEDS_GRAD,
    }
    known = {field.name for field in attrs.fields(EngineConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown engine config override(s) {unknown}; known: {sorted(known)}")
    if has_eval and overrides.get("eval_every", 1) != 1:
        raise ConfigError(
            f"eval_every={overrides['eval_every']!r}: pythae evaluates after every epoch, right "
            "after model.update(); from_pythae keeps eval_every=1 when it has eval data"
        )
    values.update(overrides)
    return EngineConfig(**values)

"""Every model of pythae's zoo trains through ``from_pythae`` as pythae's own trainer trains it.

Given the same batches (pythae's loader replaced by an in-order one), the engine's epoch
losses equal those pythae's trainer logs, and its parameters and buffers after two epochs equal
those of pythae's trainer (chosen as ``TrainingPipeline``
chooses it): for single-optimiser models under the default isolated updates, for the
multi-optimiser ones under ``updates="pythae"``. This covers what ``BaseTrainer`` adds to a
model's forward: ``epoch``, ``dataset_size``, ``uses_ddp``, ``model.update()``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("pythae")
pytest.importorskip("sklearn")

from strategies.pythae import from_pythae
from strategies.pythae.mapping import EVAL_NEEDS_GRAD, REQUIRED_CONFIG
from tests.compat.pythae_zoo import (
    EXCLUDED,
    epoch_log,
    float_state,
    make_data,
    make_model,
    pythae_losses,
    pythae_trainer,
    training_config,
    zoo,
)

ZOO = sorted(zoo())
MULTI_OPTIMIZER = sorted(REQUIRED_CONFIG)
# The loss each model's training lowers within two short epochs. DisentangledBetaVAE's loss
# rises by design (its KL capacity grows with the epoch); VAEGAN's reconstruction is measured
# in its moving discriminator's features.
WATCHED = {"DisentangledBetaVAE": "recon_loss", "VAEGAN": "discriminator_loss"}
ENGINE = {"shuffle": False, "output_dir": None, "log_every": 1000}


def test_the_zoo_is_every_model_class_pythae_exports_but_made() -> None:
    from pythae import models
    from pythae.models import normalizing_flows

    exported = {
        name
        for module in (models, normalizing_flows)
        for name in module.__all__
        if isinstance(getattr(module, name), type)
        and issubclass(getattr(module, name), torch.nn.Module)
        and name not in ("AutoModel", "BaseAE", "BaseNF", "NFModel")
    }
    assert set(EXCLUDED) == {"MADE"}
    assert set(ZOO) == exported - {"MADE"}
    assert len(ZOO) == 30  # 25 autoencoders, 5 flows (MAF, IAF, PlanarFlow, RadialFlow, PixelCNN)
    assert MULTI_OPTIMIZER == ["Adversarial_AE", "FactorVAE", "PIWAE", "RAE_L2", "VAEGAN"]
    for name in MULTI_OPTIMIZER:
        assert training_config(make_model(name), Path()).__class__.__name__ == REQUIRED_CONFIG[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_model_trains_as_pythaes_own_trainer_and_its_loss_falls(
    name: str, tmp_path: Path
) -> None:
    data = make_data(name, 48)
    model = make_model(name)
    config = training_config(model, tmp_path)
    log = epoch_log()
    trainer = pythae_trainer(model, config, data, callbacks=[log])
    twin = copy.deepcopy(trainer.model)  # after pythae's sanity-check forward
    updates = "pythae" if name in MULTI_OPTIMIZER else "isolated"
    watched = WATCHED.get(name)
    metrics = (watched,) if watched and watched not in ("loss", "discriminator_loss") else ()
    run = from_pythae(twin, config, data, updates=updates, metrics=metrics, overrides=ENGINE)
    assert run.trainer == type(trainer).__name__
    trainer.train()
    history = run.fit().history
    theirs, ours = float_state(trainer.model), float_state(twin)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)
    loss_keys = run.engine.strategy.loss_keys
    for epoch, logs in zip(history, log.logs, strict=True):
        ours_losses = {key: epoch[f"train/{key}"] for key in loss_keys}
        assert ours_losses == pytest.approx(pythae_losses(logs, loss_keys), rel=1e-5, abs=1e-6)
    key = f"train/{watched or run.engine.strategy.loss_keys[0]}"
    assert history[-1][key] < history[0][key]


@pytest.mark.slow
@pytest.mark.parametrize("name", MULTI_OPTIMIZER)
def test_multi_optimizer_models_learn_under_isolated_updates(name: str, tmp_path: Path) -> None:
    data = make_data(name, 96)
    model = make_model(name)
    before = float_state(model)
    config = training_config(model, tmp_path, epochs=3)
    watched = {"PIWAE": "decoder_loss", "VAEGAN": "discriminator_loss"}.get(name, "recon_loss")
    metrics = (watched,) if watched == "recon_loss" else ()
    run = from_pythae(model, config, data, metrics=metrics, overrides=ENGINE)
    history = run.fit().history
    assert type(run.engine.strategy).__name__ != "SharedGraphUpdates"
    assert history[-1][f"train/{watched}"] < history[0][f"train/{watched}"]
    moved = {
        role: any(not torch.equal(before[k], v) for k, v in float_state(model).items() if role in k)
        for role in ("encoder", "decoder", "discriminator")
        if hasattr(model, role)
    }
    assert all(moved.values()), moved


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EVAL_NEEDS_GRAD))
def test_models_whose_loss_needs_gradients_evaluate_as_pythae_evaluates_them(
    name: str, tmp_path: Path
) -> None:
    """pythae's eval_step catches their no_grad error and reruns the batch with gradients on,
    in eval mode, with the epoch and the eval set's size; the engine evaluates them with
    ``eval_with_grad``. After one epoch with evaluation (``model.update()`` before it), the
    same random draws give the same eval loss."""
    data = make_data(name, 64)
    train, held_out = data[:48], data[48:]
    model = make_model(name)
    config = training_config(model, tmp_path, epochs=1)
    trainer = pythae_trainer(model, config, train, held_out)
    twin = copy.deepcopy(trainer.model)
    run = from_pythae(twin, config, train, held_out, overrides=ENGINE)
    trainer.train()
    history = run.fit().history
    assert torch.isfinite(torch.tensor(history[-1]["eval/loss"]))
    trainer.model.eval()
    torch.manual_seed(5)
    losses = [
        trainer.model(inputs, epoch=1, dataset_size=len(held_out), uses_ddp=False).loss.item()
        for inputs in trainer.eval_loader  # pythae's retry: with gradients, in eval mode
    ]
    torch.manual_seed(5)
    ours = run.evaluate()["loss"]
    assert ours == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_exactly_the_models_that_call_autograd_in_their_loss_evaluate_with_gradients(
    name: str,
) -> None:
    model = make_model(name)
    model.eval()
    batch = {"data": make_data(name, 4)}
    try:
        with torch.no_grad():
            model(batch, epoch=1, dataset_size=4, uses_ddp=False)
        needs_grad = False
    except RuntimeError as error:
        assert "does not require grad" in str(error)
        needs_grad = True
    assert needs_grad == (name in EVAL_NEEDS_GRAD)
    config = from_pythae(model, None, batch["data"]).engine.config
    assert config.eval_with_grad == needs_grad

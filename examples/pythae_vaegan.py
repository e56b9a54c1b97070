"""pythae's VAEGAN on the bundled digits, with pythae's default settings, three ways: the engine
with isolated updates, the engine with pythae's updates (``SharedGraphUpdates``), and pythae's
own ``TrainingPipeline``. Prints the held-out pixel error after each epoch.

Run from the repository root:
``python examples/pythae_vaegan.py [--epochs 10] [--seeds 0 1 2]``.

pixel error = mean over the 270 held-out digits of the summed squared difference between
``recon_x`` (one eval-mode forward, fixed random draws) and the image (64 pixels in [0, 1]).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Event
from examples.data import digits
from strategies.pythae import load_from_json

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL_CONFIG = CONFIGS / "pythae_vaegan_model_config.json"
TRAINING_CONFIG = CONFIGS / "pythae_vaegan_training_config.json"


def pixel_error(model: torch.nn.Module, images: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        recon = model({"data": images}).recon_x
    model.train(was_training)
    return float((recon - images).pow(2).flatten(1).sum(1).mean())


def engine_run(updates: str, seed: int, epochs: int, held_out: torch.Tensor) -> list[float]:
    setup = load_from_json(MODEL_CONFIG, TRAINING_CONFIG, seed=seed)
    setup.training_config.seed = seed
    setup.training_config.num_epochs = epochs
    run = setup.run(
        digits("train")["data"],
        {"data": held_out},
        updates=updates,
        overrides={"output_dir": None, "log_every": 1000, "device": "cpu"},
    )
    errors = [pixel_error(run.model, held_out)]
    run.engine.on(Event.EPOCH_END, lambda state: errors.append(pixel_error(run.model, held_out)))
    run.fit()
    return errors


def pythae_run(seed: int, epochs: int, held_out: torch.Tensor) -> list[float]:
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers.training_callbacks import TrainingCallback

    setup = load_from_json(MODEL_CONFIG, TRAINING_CONFIG, seed=seed)
    config = setup.training_config
    config.seed, config.num_epochs, config.no_cuda = seed, epochs, True
    errors = [pixel_error(setup.model, held_out)]

    class EveryEpoch(TrainingCallback):  # type: ignore[misc]
        def on_epoch_end(self, training_config: Any, **kwargs: Any) -> None:
            errors.append(pixel_error(kwargs["model"], held_out))

    with tempfile.TemporaryDirectory() as folder:
        config.output_dir = folder
        TrainingPipeline(setup.model, config)(
            digits("train")["data"], held_out, callbacks=[EveryEpoch()]
        )
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    from loguru import logger

    logger.remove()
    torch.set_num_threads(1)
    held_out = digits("eval")["data"]
    for seed in args.seeds:
        rows = {
            "engine, isolated": engine_run("isolated", seed, args.epochs, held_out),
            "engine, pythae": engine_run("pythae", seed, args.epochs, held_out),
            "pythae's trainer": pythae_run(seed, args.epochs, held_out),
        }
        print(f"seed {seed}: pixel error per epoch (0 = before training)")
        for name, errors in rows.items():
            print(f"  {name:18s} " + " ".join(f"{e:5.2f}" for e in errors))


if __name__ == "__main__":
    main()

"""Peer trainers on the same model, data and optimiser, each measured only when installed.

pythae's ``BaseTrainer`` trains a pythae ``VAE`` built from the very same encoder and decoder
modules (its own ``DataLoader``, per-sample collation, its output folder and final save: what
pythae does on every run). Ignite and Lightning drive our model over the same pre-shuffled
slices as the floor, so the difference is the trainer's own overhead. None of them is a
dependency of the project; ``available()`` says which are importable.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.harness import EpochFn, Runner
from benchmarks.loops import LR, OptimizerFactory, fresh, fused_adam

Prepare = Callable[[], EpochFn]
PEERS = ("pythae", "ignite", "lightning")


def available() -> list[str]:
    """The peers importable here (``importlib`` finds them without importing them)."""
    names = {"pythae": "pythae", "ignite": "ignite", "lightning": "lightning"}
    return [peer for peer in PEERS if importlib.util.find_spec(names[peer]) is not None]


class _Slices:
    """The floor's data path as an iterable: slices of a fresh shuffle on every pass."""

    def __init__(self, data: torch.Tensor, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.data), generator=self.generator).to(self.data.device)
        shuffled = self.data.index_select(0, order)
        for lo in range(0, len(self.data), self.batch_size):
            yield {"data": shuffled[lo : lo + self.batch_size]}


def ignite_runner(
    template: torch.nn.Module, data: torch.Tensor, batch_size: int, device: torch.device
) -> Runner:
    """Ignite's ``Engine`` with the usual process function (it returns ``loss.item()``, as
    Ignite's supervised trainer does by default)."""
    from ignite.engine import Engine as IgniteEngine

    def prepare() -> EpochFn:
        model = fresh(template, device)
        slices = _Slices(data.to(device), batch_size)
        holder: dict[str, Any] = {}

        def update(engine: Any, batch: dict[str, torch.Tensor]) -> float:
            optimizer = holder["optimizer"]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = model(batch)["loss"]
            loss.backward()
            optimizer.step()
            return float(loss.item())

        trainer = IgniteEngine(update)

        def epoch() -> int:
            torch.manual_seed(0)
            holder["optimizer"] = fused_adam(model)
            state = trainer.run(slices, max_epochs=1)
            return int(state.iteration)

        return epoch

    return Runner("Ignite Engine, fused Adam", prepare)


def lightning_runner(
    template: torch.nn.Module, data: torch.Tensor, batch_size: int, device: torch.device
) -> Runner:
    """Lightning's ``Trainer`` with logging, checkpointing, progress bar and summary off."""
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> None:
            super().__init__()
            self.model, self.make_optimizer = model, make_optimizer

        def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
            return self.model(batch)["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.make_optimizer(self.model)

    def prepare() -> EpochFn:
        module = Module(fresh(template, device), fused_adam)
        slices = _Slices(data.to(device), batch_size)
        trainer = lightning.Trainer(
            max_epochs=1,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )

        def epoch() -> int:
            torch.manual_seed(0)
            trainer.fit(module, train_dataloaders=slices)
            return int(trainer.global_step)

        return epoch

    return Runner("Lightning Trainer, fused Adam", prepare)


def pythae_runner(
    template: torch.nn.Module, data: torch.Tensor, batch_size: int, device: torch.device
) -> Runner:
    """pythae's ``BaseTrainer`` on a pythae ``VAE`` wrapping ``template``'s encoder and
    decoder (``template`` is ``examples.models.VAE``)."""
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    class Encoder(BaseEncoder):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            mean, log_var = self.inner(x)
            return ModelOutput(embedding=mean, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z: torch.Tensor) -> Any:
            return ModelOutput(reconstruction=self.inner(z))

    shape = tuple(template.decoder.input_shape)  # type: ignore[union-attr]
    dataset = BaseDataset(data.cpu(), torch.zeros(len(data)))
    folder = tempfile.mkdtemp(prefix="pythae-bench-")

    def prepare() -> EpochFn:
        copy = fresh(template, device)
        config = VAEConfig(input_dim=shape, latent_dim=copy.latent_dim, reconstruction_loss="bce")
        model = VAE(config, encoder=Encoder(copy.encoder), decoder=Decoder(copy.decoder))
        training = BaseTrainerConfig(
            output_dir=folder,
            per_device_train_batch_size=batch_size,
            num_epochs=1,
            learning_rate=LR,
            optimizer_cls="Adam",
            optimizer_params={"fused": True},
            no_cuda=device.type != "cuda",
            seed=0,
        )
        trainer = BaseTrainer(model, dataset, training_config=training)

        def epoch() -> int:
            trainer.train()
            return len(trainer.train_loader)

        return epoch

    return Runner("pythae BaseTrainer, fused Adam", prepare)


PEER_RUNNERS: dict[str, Callable[..., Runner]] = {
    "pythae": pythae_runner,
    "ignite": ignite_runner,
    "lightning": lightning_runner,
}

"""On a CUDA device (skipped without one): every strategy trains in each precision, a resumed
run equals the uninterrupted one, bitwise (CUDA random streams and the fp16 GradScaler
included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from callbacks import Checkpointing
from engine import Engine, EngineConfig
from tests.engine.checkpoint_cases import KINDS, data, equal, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(
    tmp: Path, kind: str, precision: str, name: str, max_steps: int | None, resume: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    model, strategy = make_case(kind, seed=0 if resume is None else 1, n_critic=2)
    config = EngineConfig(
        epochs=3,
        batch_size=4,
        device="cuda",
        precision=precision,
        max_steps=max_steps,
        output_dir=tmp,
        run_name=name,
        log_every=2,
        monitor="train/discriminator_loss" if kind == "two_phase" else None,
    )
    checkpointing = Checkpointing(every_n_steps=2, best_k=1, durable=False)
    result = Engine(strategy, config, [checkpointing]).fit(model, data(30), resume=resume)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    return state, strategy.state_dict(), result


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_cuda_run_equals_the_uninterrupted_one(
    tmp_path: Path, kind: str, precision: str
) -> None:
    expected, expected_strategy, expected_result = _run(tmp_path, kind, precision, "a", None, None)
    assert all(torch.isfinite(value).all() for value in expected.values())
    _run(tmp_path, kind, precision, "b", 11, None)  # stops inside the second epoch
    resumed, resumed_strategy, resumed_result = _run(tmp_path, kind, precision, "b", None, "last")
    assert equal(expected, resumed)
    assert equal(expected_strategy, resumed_strategy)
    assert resumed_result.steps == expected_result.steps


class HostMetric(torch.nn.Module):
    """Trains on the GPU but returns one metric from the host, as models sometimes do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.linear(x) - x).pow(2).mean(), "host_metric": torch.tensor(2.0)}


def test_metrics_from_the_host_and_the_device_mix(tmp_path: Path) -> None:
    from engine import OptimizerSpec
    from strategies import Standard

    config = EngineConfig(epochs=2, batch_size=4, device="cuda", output_dir=None, log_every=3)
    result = Engine(Standard(OptimizerSpec("Adam", lr=1e-2), metrics=("host_metric",)), config).fit(
        HostMetric(), data(30)
    )
    assert result.history[-1]["train/host_metric"] == 2.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["vae", "aae", "rae", "vaegan", "wgan"])
def test_every_reference_model_trains_under_cuda_autocast(name: str, precision: str) -> None:
    """CUDA autocast refuses some ops that CPU autocast allows (``binary_cross_entropy`` on
    probabilities): every example model must run in both precisions there."""
    from engine import OptimizerSpec
    from examples.data import digits
    from examples.demo_multi import workloads
    from examples.models import VAE
    from strategies import Standard

    if name == "vae":
        reference, strategy = VAE(), Standard(OptimizerSpec("Adam", lr=1e-3))
    else:
        reference, strategy = workloads()[name]
    model = type(reference)(hidden=32)
    data = {"data": digits("train")["data"][:256]}  # 8 steps: WGAN-GP steps its generator
    config = EngineConfig(
        epochs=1, batch_size=32, device="cuda", precision=precision, output_dir=None
    )
    history = Engine(strategy, config).fit(model, data).history
    for loss_key in strategy.loss_keys:
        assert torch.isfinite(torch.tensor(history[-1][f"train/{loss_key}"]))

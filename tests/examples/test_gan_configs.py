"""examples/configs/{dcgan,vqgan}_digits.toml: each trains one short epoch through the CLI and
leaves its sample grids, FID/KID, EMA weights and checkpoints; the example models keep the
two-phase contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.cli.main import build, load_run_config, main
from examples.gan_models import DCGAN, VQGAN

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "engine.epochs=1",
    "data.train.eval_fraction=0.9",  # 10% of the digits: a few batches
    "engine.log_every=1",
    'engine.run_name="run"',
]


def fit_short(config: str, tmp_path: Path, *extra: str) -> Path:
    sets = [*SHORT, f'engine.output_dir="{tmp_path.as_posix()}"', *extra]
    args = [arg for item in sets for arg in ("--set", item)]
    assert main(["fit", str(ROOT / "examples" / "configs" / config), "--threads", "1", *args]) == 0
    return tmp_path / "run"


def history(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_dcgan_config_trains_one_short_epoch(tmp_path: Path) -> None:
    run_dir = fit_short("dcgan_digits.toml", tmp_path, "callbacks.2.num_samples=200")
    (record,) = history(run_dir)
    for key in ("eval/fid", "eval/kid", "train/generator_loss", "train/discriminator_loss"):
        assert key in record, sorted(record)
    assert record["eval/fid"] > 0
    samples = sorted(path.name for path in (run_dir / "samples").iterdir())
    assert samples == ["samples_epoch_001.png", "samples_strip.png"]
    model = build(load_run_config(run_dir), with_callbacks=False).model
    ema = torch.load(run_dir / "model_ema.pt", weights_only=True)
    model.load_state_dict(ema)
    final = torch.load(run_dir / "model_final.pt", weights_only=True)
    assert torch.equal(ema["discriminator.body.0.weight"], final["discriminator.body.0.weight"])
    assert not torch.equal(ema["generator.body.0.weight"], final["generator.body.0.weight"])
    assert (run_dir / "model_best.pt").is_file()  # best by eval/fid


@pytest.mark.slow
def test_the_vqgan_config_trains_one_short_epoch(tmp_path: Path) -> None:
    run_dir = fit_short("vqgan_digits.toml", tmp_path, "strategy.disc_start=3")
    (record,) = history(run_dir)
    for key in ("eval/fid", "eval/recon_loss", "train/d_weight", "train/codebook_loss"):
        assert key in record, sorted(record)
    assert record["train/d_weight"] > 0  # the adversarial term started after 3 of 6 steps
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == [
        "samples_epoch_001.png",
        "samples_strip.png",
    ]
    ema = torch.load(run_dir / "model_ema.pt", weights_only=True)
    final = torch.load(run_dir / "model_final.pt", weights_only=True)
    assert not torch.equal(
        ema["autoencoder.decoder.0.weight"], final["autoencoder.decoder.0.weight"]
    )
    assert torch.equal(ema["discriminator.body.0.weight"], final["discriminator.body.0.weight"])


def test_the_dcgan_phases_return_their_losses_and_sample_takes_noise() -> None:
    torch.manual_seed(0)
    model = DCGAN(image_size=16, latent_dim=4, width=4)
    batch = {"data": torch.rand(3, 1, 16, 16)}
    critic = model(batch, phase="discriminator")
    assert set(critic) == {
        "fake_x",
        "discriminator_loss",
        "real",
        "real_scores",
        "fake",
        "fake_scores",
    }
    assert critic["real"].requires_grad and critic["fake"].requires_grad
    assert not critic["fake_x"].requires_grad  # no generator graph in the critic's phase
    assert set(model(batch, phase="generator")) == {"fake_x", "generator_loss"}
    with torch.no_grad():
        assert not model(batch, phase="discriminator")["real"].requires_grad
    assert model.sample(torch.zeros(2, 4)).shape == (2, 1, 16, 16)
    assert model.sample(5).shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match="'critic'"):
        model(batch, phase="critic")
    with pytest.raises(ValueError, match="multiple of 4, got 10"):
        DCGAN(image_size=10)


def test_the_vqgan_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    torch.manual_seed(0)
    model = VQGAN(image_size=8, width=4, code_dim=4, codebook_size=8, disc_weight=0.5)
    batch = {"data": torch.rand(2, 1, 8, 8)}
    outputs = model(batch, phase="generator")
    recon, adversarial = outputs["recon_loss"], outputs["generator_loss"]
    last = model.autoencoder.last_layer
    (g_recon,) = torch.autograd.grad(recon, last, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adversarial, last, retain_graph=True)
    expected = 0.5 * g_recon.norm() / (g_adv.norm() + 1e-4)
    assert float(outputs["d_weight"]) == pytest.approx(float(expected), rel=1e-5)
    assert not outputs["d_weight"].requires_grad
    loss = outputs["recon_loss"] + outputs["codebook_loss"] + outputs["d_weight"] * adversarial
    assert float(outputs["autoencoder_loss"].detach()) == pytest.approx(
        float(loss.detach()), rel=1e-6
    )


def test_the_vqgan_adversarial_term_follows_the_strategys_disc_factor() -> None:
    torch.manual_seed(0)
    model = VQGAN(image_size=8, width=4, code_dim=4, codebook_size=8)
    batch = {"data": torch.rand(2, 1, 8, 8)}
    with torch.no_grad():
        off = model(batch, phase="generator", disc_factor=0.0)
    assert float(off["d_weight"]) == 0.0
    assert float(off["autoencoder_loss"]) == pytest.approx(
        float(off["recon_loss"] + off["codebook_loss"]), rel=1e-6
    )
    on = model(batch, phase="generator", disc_factor=1.0)
    assert float(on["d_weight"]) > 0.0

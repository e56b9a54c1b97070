"""engine/cli/commands.py: GAN strategies spelled in TOML. Regularisers as tables, Sequential's
optimizers and phases as [[strategy.phases]], SharedGraphUpdates' losses in backward order;
what they build equals the Python API's objects, and a bad name is one error line naming the
key and the value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli.main import build, load_run_config, main
from engine.config.file import read_toml

# A small DCGAN on the 8x8 digits (10% of them: 12 steps of 16), R1 lazily every 4th step.
DCGAN_HEAD = """
[model]
factory = "examples.gan_models:DCGAN"
image_size = 8
latent_dim = 8
width = 8

[data.train]
factory = "examples.gan_data:digits_images"
split = "train"
size = 8
eval_fraction = 0.9

[engine]
epochs = 1
batch_size = 16
seed = 3
log_every = 4
output_dir = "{out}"
run_name = "run"

[[callbacks]]
name = "ProgressBar"
disable = true
"""

OPTIMIZERS = """
[strategy.optimizers.discriminator]
name = "Adam"
lr = 2e-3
betas = [0.5, 0.99]

[strategy.optimizers.generator]
name = "Adam"
lr = 2e-3
betas = [0.5, 0.99]
"""

ADVERSARIAL = (
    """
[strategy]
name = "Adversarial"
two_phase = true
generator_loss_key = "generator_loss"
regularisers = [{ name = "r1", gamma = 0.5 }]
regularise_every = 4
"""
    + OPTIMIZERS
)

SEQUENTIAL = (
    """
[strategy]
name = "Sequential"
"""
    + OPTIMIZERS
    + """
[[strategy.phases]]
role = "discriminator"
forward = "discriminator"
loss_key = "discriminator_loss"

[[strategy.phases]]
role = "discriminator"
forward = "discriminator"
regularisers = [{ name = "r1", gamma = 0.5 }]
every = 4

[[strategy.phases]]
role = "generator"
forward = "generator"
loss_key = "generator_loss"
"""
)


def write(folder: Path, name: str, strategy: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(DCGAN_HEAD.format(out=(folder / name).as_posix()) + strategy)
    return path


def run_dir(config: Path) -> Path:
    return config.parent / config.stem / "run"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model_final.pt", weights_only=True)  # type: ignore[no-any-return]


def history(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert history(a) == history(b)


def test_toml_regularisers_build_the_python_apis_objects(tmp_path: Path) -> None:
    from strategies import r1

    config = load_run_config(write(tmp_path, "adversarial", ADVERSARIAL))
    strategy = build(config, with_callbacks=False).strategy
    assert type(strategy).__name__ == "Adversarial"
    assert strategy.regularisers == (r1(0.5),)
    assert strategy.regularise_every == 4


def test_toml_phases_build_the_python_apis_phases(tmp_path: Path) -> None:
    from engine.config.specs import OptimizerSpec
    from strategies import Phase, r1

    config = load_run_config(write(tmp_path, "sequential", SEQUENTIAL))
    strategy = build(config, with_callbacks=False).strategy
    assert type(strategy).__name__ == "Sequential"
    assert strategy.runner.phases == (
        Phase("discriminator", "discriminator", "discriminator_loss"),
        Phase("discriminator", "discriminator", regularisers=(r1(0.5),), every=4),
        Phase("generator", "generator", "generator_loss"),
    )
    assert strategy.optimizers == {
        role: OptimizerSpec("Adam", lr=2e-3, betas=[0.5, 0.99])
        for role in ("discriminator", "generator")
    }


@pytest.mark.slow
def test_sequential_phases_in_toml_train_as_two_phase_adversarial(tmp_path: Path) -> None:
    """The same three phases, written out as [[strategy.phases]], train bitwise as the
    two-phase Adversarial with lazy R1 that writes them for you."""
    adversarial = write(tmp_path, "adversarial", ADVERSARIAL)
    sequential = write(tmp_path, "sequential", SEQUENTIAL)
    assert main(["fit", str(adversarial)]) == 0
    assert main(["fit", str(sequential)]) == 0
    assert len(history(run_dir(sequential))) == 1
    assert_same_run(run_dir(adversarial), run_dir(sequential))


@pytest.mark.slow
def test_a_sequential_run_resumes_from_its_written_config(tmp_path: Path) -> None:
    """The run folder's config.toml holds the phases as [[strategy.phases]] tables: a run
    stopped after one epoch and resumed from its folder ends as the run that never stopped."""
    straight = write(tmp_path / "a", "sequential", SEQUENTIAL)
    stopped = write(tmp_path / "b", "sequential", SEQUENTIAL)
    assert main(["fit", str(straight), "--set", "engine.epochs=2"]) == 0
    assert main(["fit", str(stopped)]) == 0
    written = read_toml((run_dir(stopped) / "config.toml").read_text())
    assert [phase["role"] for phase in written["strategy"]["phases"]] == [
        "discriminator",
        "discriminator",
        "generator",
    ]
    assert main(["resume", str(run_dir(stopped)), "--set", "engine.epochs=2"]) == 0
    assert_same_run(run_dir(straight), run_dir(stopped))


@pytest.mark.parametrize(
    ("strategy", "override", "message"),
    [
        (
            ADVERSARIAL,
            'strategy.regularisers.0.name="r3"',
            "strategy.regularisers.0.name = 'r3' is not a regulariser; choose one of "
            "['r1', 'r2', 'wgan_gp']",
        ),
        (
            ADVERSARIAL,
            "strategy.regularisers.0.gama=0.5",
            "[strategy.regularisers.0] 'r1' can not take arguments ['gama', 'gamma']",
        ),
        (ADVERSARIAL, 'strategy.regularisers="r1"', "strategy.regularisers must be a list"),
        (
            ADVERSARIAL,
            'strategy.regularisers.0.name="builtins:dict"',
            "strategy.regularisers.0.name = 'builtins:dict' returned a dict, not a GradientPenalty",
        ),
        (
            ADVERSARIAL,
            "strategy.regularisers.0.gamma=-1",
            "[strategy.regularisers.0] r1: gamma must be a finite number >= 0, got -1",
        ),
        (
            SEQUENTIAL,
            'strategy.phases.2.role="critic"',
            "strategy.phases.2.role = 'critic' is not a role of [strategy.optimizers]; the "
            "roles are ['discriminator', 'generator']",
        ),
        (
            SEQUENTIAL,
            'strategy.phases.1.regularisers.0.name="R1"',
            "strategy.phases.1.regularisers.0.name = 'R1' is not a regulariser",
        ),
        (SEQUENTIAL, "strategy.phases.0.every=0", "every must be a positive integer, got 0"),
        (SEQUENTIAL, 'strategy.phases.0.loss="x"', "[strategy.phases.0] 'Phase' can not take"),
        (SEQUENTIAL, 'strategy.phases="x"', "strategy.phases must be a list of tables"),
    ],
)
def test_a_bad_regulariser_or_phase_is_one_line_naming_key_and_value(
    strategy: str, override: str, message: str, tmp_path: Path, capsys: Any
) -> None:
    config = write(tmp_path, "config", strategy)
    argv = ["fit", str(config), "--set", override]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


VAEGAN = """
[model]
factory = "examples.models:VAEGAN"
input_shape = [1, 8, 8]
latent_dim = 4
hidden = 32

[data.train]
factory = "examples.data:digits"
split = "train"
eval_fraction = 0.9

[strategy]
name = "SharedGraphUpdates"
losses = {losses}

[strategy.optimizers.encoder]
name = "Adam"
lr = 1e-3

[strategy.optimizers.decoder]
name = "Adam"
lr = 1e-3

[strategy.optimizers.discriminator]
name = "Adam"
lr = 1e-3

[engine]
epochs = 1
batch_size = 16
output_dir = "{out}"
run_name = "run"

[[callbacks]]
name = "ProgressBar"
disable = true
"""

PYTHAE_ORDER = (
    '{ encoder = "encoder_loss", decoder = "decoder_loss", discriminator = "discriminator_loss" }'
)
REVERSED_ORDER = (
    '{ discriminator = "discriminator_loss", decoder = "decoder_loss", encoder = "encoder_loss" }'
)


def shared_graph(folder: Path, name: str, losses: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(VAEGAN.format(losses=losses, out=(folder / name).as_posix()))
    return path


def test_shared_graph_updates_take_their_roles_in_the_order_of_losses(tmp_path: Path) -> None:
    config = load_run_config(shared_graph(tmp_path, "pythae", PYTHAE_ORDER))
    strategy = build(config, with_callbacks=False).strategy
    assert type(strategy).__name__ == "SharedGraphUpdates"
    assert list(strategy.roles) == ["encoder", "decoder", "discriminator"]
    assert {role: fields.loss_key for role, fields in strategy.roles.items()} == {
        "encoder": "encoder_loss",
        "decoder": "decoder_loss",
        "discriminator": "discriminator_loss",
    }


@pytest.mark.slow
def test_the_backward_order_of_shared_graph_updates_is_the_written_one(tmp_path: Path) -> None:
    """pythae's order (encoder, decoder, discriminator) and the reverse leak different
    gradients: the written order is the one trained, and it survives the run folder's
    config.toml."""
    pythae = shared_graph(tmp_path, "pythae", PYTHAE_ORDER)
    backwards = shared_graph(tmp_path, "reversed", REVERSED_ORDER)
    assert main(["fit", str(pythae)]) == 0
    assert main(["fit", str(backwards)]) == 0
    first, second = weights(run_dir(pythae)), weights(run_dir(backwards))
    assert not all(torch.equal(first[key], second[key]) for key in first)
    written = read_toml((run_dir(pythae) / "config.toml").read_text())
    assert list(written["strategy"]["losses"]) == ["encoder", "decoder", "discriminator"]
    again = load_run_config(run_dir(pythae))
    assert list(build(again, with_callbacks=False).strategy.roles) == list(
        written["strategy"]["losses"]
    )


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ('{ encoder = "encoder_loss", decoder = "decoder_loss" }', "strategy.losses names"),
        ('"encoder_loss"', "needs strategy.losses"),
    ],
)
def test_bad_shared_graph_losses_are_one_line(
    losses: str, message: str, tmp_path: Path, capsys: Any
) -> None:
    assert main(["fit", str(shared_graph(tmp_path, "bad", losses))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()

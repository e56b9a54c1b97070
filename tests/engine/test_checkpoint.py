"""The checkpoint format: round trip, atomicity, and refusing bad checkpoints without damage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import Checkpointing
from engine import CheckpointError, Engine, EngineConfig, OptimizerSpec
from engine.checkpoint.format import (
    MARKER,
    MODEL_FILE,
    TRAINING_FILE,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    write_checkpoint,
)
from strategies import Standard
from tests.engine.checkpoint_cases import data, equal, make_case
from tests.helpers import TinyRegressor


def _train(tmp: Path, model: torch.nn.Module | None = None, **config: Any) -> Path:
    """A finished two-epoch run in ``tmp/run``; returns the run folder."""
    model = model if model is not None else TinyRegressor(3)
    settings_ = {
        "epochs": 2,
        "batch_size": 4,
        "device": "cpu",
        "output_dir": tmp,
        "run_name": "run",
    }
    settings_.update(config)
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        EngineConfig(**settings_),
        [Checkpointing(durable=False)],
    )
    return engine.fit(model, data(10)).run_dir  # type: ignore[return-value]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _rewrite_marker(checkpoint: Path) -> None:
    """Make the marker agree with the files as they are now (what an attacker would do)."""
    marker = json.loads((checkpoint / MARKER).read_text())
    for name in marker["files"]:
        content = (checkpoint / name).read_bytes()
        marker["files"][name] = {
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }
    (checkpoint / MARKER).write_text(json.dumps(marker))


def _resume(
    tmp: Path, model: torch.nn.Module | None = None, resume: Any = "last", **config: Any
) -> None:
    settings_ = {
        "epochs": 3,
        "batch_size": 4,
        "device": "cpu",
        "output_dir": tmp,
        "run_name": "run",
    }
    settings_.update(config)
    engine = Engine(Standard(OptimizerSpec("Adam", lr=1e-2)), EngineConfig(**settings_))
    engine.fit(model if model is not None else TinyRegressor(3), data(10), resume=resume)


tensors = st.builds(
    lambda shape, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.integers(0, 2**16),
)
payloads = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=25, deadline=None)
@given(
    model_state=st.dictionaries(st.text(min_size=1, max_size=5), tensors, max_size=3),
    training=payloads,
)
def test_a_checkpoint_reads_back_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, model_state: dict[str, Any], training: Any
) -> None:
    folder = tmp_path_factory.mktemp("ckpt")
    (path,) = write_checkpoint(folder, ["last"], model_state, {"x": training}, {"saved_at_ns": 1})
    loaded = load_checkpoint(path)
    assert equal(loaded.model_state, model_state)
    assert equal(loaded.training_state, {"x": training})
    assert sorted(p.name for p in folder.iterdir()) == ["last"]


def test_plain_weights_in_a_checkpoint_load_with_torch_alone(tmp_path: Path) -> None:
    model = TinyRegressor(3)
    run_dir = _train(tmp_path, model)
    for path in (run_dir / "checkpoints" / "last" / MODEL_FILE, run_dir / "model_final.pt"):
        state = torch.load(path, weights_only=True)
        assert equal(state, model.state_dict())


def test_a_pickle_payload_that_would_run_code_is_refused(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    last = run_dir / "checkpoints" / "last"
    witness = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {witness}",))

    (last / TRAINING_FILE).unlink()  # a hard link shared with other checkpoints: replace it
    torch.save({"progress": Payload()}, last / TRAINING_FILE)
    _rewrite_marker(last)
    before = _folder_bytes(run_dir)
    with pytest.raises(CheckpointError, match=r"training\.pt.*could run code"):
        _resume(tmp_path)
    assert not witness.exists()
    assert _folder_bytes(run_dir) == before


def test_a_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    model_file = run_dir / "checkpoints" / "last" / MODEL_FILE
    content = model_file.read_bytes()
    model_file.unlink()
    model_file.write_bytes(content[: len(content) // 2])
    before = _folder_bytes(run_dir)
    with pytest.raises(CheckpointError, match=r"last/model\.pt is truncated or corrupt"):
        _resume(tmp_path, resume=model_file.parent)
    assert _folder_bytes(run_dir) == before


def test_a_flipped_byte_is_refused_as_corrupt(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    target = run_dir / "checkpoints" / "last" / TRAINING_FILE
    content = bytearray(target.read_bytes())
    content[len(content) // 2] ^= 0xFF
    target.unlink()
    target.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match=r"training\.pt is corrupt: its sha256"):
        load_checkpoint(target.parent)


def test_a_folder_without_marker_is_refused_and_ignored(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    checkpoints = run_dir / "checkpoints"
    latest_before = latest_checkpoint(run_dir)
    interrupted = checkpoints / "step-00000099"
    interrupted.mkdir()
    (interrupted / MODEL_FILE).write_bytes(b"partial")
    with pytest.raises(CheckpointError, match=r"step-00000099 is incomplete: it has no COMPLETE"):
        load_checkpoint(interrupted)
    assert latest_checkpoint(run_dir) == latest_before


def test_a_foreign_model_is_refused_and_the_run_folder_is_untouched(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    before = _folder_bytes(run_dir)
    with pytest.raises(CheckpointError, match=r"foreign to model TinyRegressor: 'linear.weight'"):
        _resume(tmp_path, TinyRegressor(5))
    assert _folder_bytes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_foreign_strategy_is_refused(tmp_path: Path) -> None:
    config = EngineConfig(epochs=2, batch_size=4, device="cpu", output_dir=tmp_path, run_name="run")
    model, strategy = make_case("adversarial", 0)
    Engine(strategy, config, [Checkpointing(durable=False)]).fit(model, data(10))
    model, strategy = make_case("coupled_adversarial", 0)
    with pytest.raises(CheckpointError, match=r"strategy 'Adversarial'; this run uses 'Coupled"):
        Engine(strategy, config).fit(model, data(10), resume="last")


@pytest.mark.parametrize(
    ("field", "saved", "changed"),
    [
        ("batch_size", 4, 5),
        ("seed", 0, 1),
        ("shuffle", True, False),
        ("drop_last", False, True),
        ("accumulate_steps", 1, 2),
    ],
)
def test_a_changed_data_order_is_refused_naming_the_field(
    tmp_path: Path, field: str, saved: Any, changed: Any
) -> None:
    """Each field that decides which samples a step sees must match, or the resumed run would
    silently train on another order: refused naming the field and both values."""
    run_dir = _train(tmp_path, **{field: saved})
    before = _folder_bytes(run_dir)
    with pytest.raises(
        CheckpointError, match=rf"{field}={saved!r}; this run has {field}={changed!r}"
    ):
        _resume(tmp_path, **{field: changed})
    assert _folder_bytes(run_dir) == before


class Renamed(torch.nn.Module):
    """TinyRegressor's parameters under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.other = torch.nn.Linear(3, 3)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.other(x) - x).pow(2).mean()}


class WithoutBias(torch.nn.Module):
    """TinyRegressor without its bias: the checkpoint's ``linear.bias`` is unexpected."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3, bias=False)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.linear(x) - x).pow(2).mean()}


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (Renamed, r"missing keys \['other.bias', 'other.weight'\], unexpected keys \['linear"),
        (WithoutBias, r"missing keys \[\], unexpected keys \['linear.bias'\]"),
        (lambda: TinyRegressor(3).double(), r"'linear.(weight|bias)' is .*float32 there.*float64"),
    ],
    ids=["renamed", "unexpected-key", "dtype"],
)
def test_a_foreign_model_state_is_our_error_naming_the_keys_or_dtypes(
    tmp_path: Path, make_model: Any, message: str
) -> None:
    """Other parameter names, a parameter fewer, or another dtype: a ``CheckpointError`` (not a
    raw ``KeyError`` or ``RuntimeError`` from loading) before anything is written."""
    run_dir = _train(tmp_path)
    before = _folder_bytes(run_dir)
    with pytest.raises(CheckpointError, match=message):
        _resume(tmp_path, make_model())
    assert _folder_bytes(run_dir) == before


def test_resume_arguments_that_name_nothing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"needs both, got output_dir=.*run_name=None"):
        resolve_resume("last", tmp_path, None)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint under"):
        resolve_resume("last", tmp_path, "absent")
    with pytest.raises(CheckpointError, match=r"is neither 'last', a checkpoint folder"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path, None)
    with pytest.raises(CheckpointError, match=r"got 3"):
        resolve_resume(3, tmp_path, None)  # type: ignore[arg-type]


def test_a_run_folder_or_a_checkpoint_folder_can_be_resumed(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    assert resolve_resume(str(run_dir), None, None) == latest_checkpoint(run_dir)
    epoch_one = run_dir / "checkpoints" / "epoch-0001"
    assert resolve_resume(epoch_one, None, None) == epoch_one
    model = TinyRegressor(3)
    config = EngineConfig(epochs=2, batch_size=4, device="cpu", output_dir=tmp_path, run_name="x")
    result = Engine(Standard(OptimizerSpec("Adam", lr=1e-2)), config).fit(
        model, data(10), resume=epoch_one
    )
    assert result.run_dir == run_dir  # the same run goes on in its own folder
    assert result.steps == 6


def test_state_that_would_not_load_weights_only_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"training\.pt\['callbacks'\]\['Mine'\] is a object"):
        write_checkpoint(tmp_path, ["last"], {}, {"callbacks": {"Mine": object()}}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_save_killed_between_its_renames_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """``last`` is moved aside before its replacement is renamed in: a crash between the two
    renames leaves two complete folders under hidden names, and ``last`` resolution finds the
    newer one."""
    folder = tmp_path / "checkpoints"
    (old,) = write_checkpoint(folder, ["last"], {"w": torch.zeros(2)}, {}, {"saved_at_ns": 1})
    (new,) = write_checkpoint(folder, ["next"], {"w": torch.ones(2)}, {}, {"saved_at_ns": 2})
    old.rename(folder / ".old-last-1-1")
    new.rename(folder / ".staging-last-1-2")
    found = latest_checkpoint(tmp_path)
    assert found == folder / ".staging-last-1-2"
    assert torch.equal(load_checkpoint(found).model_state["w"], torch.ones(2))


def test_a_changed_precision_is_refused(tmp_path: Path) -> None:
    _train(tmp_path)
    with pytest.raises(CheckpointError, match=r"precision 'fp32' \(no GradScaler\); this run has"):
        _resume(tmp_path, precision="fp16")


def test_a_newer_checkpoint_torn_by_a_power_cut_is_passed_over(tmp_path: Path) -> None:
    """Marker on disk but a file short (its data never reached the disk): ``last`` resolution
    takes the checkpoint before it."""
    folder = tmp_path / "checkpoints"
    (older,) = write_checkpoint(
        folder, ["epoch-0001"], {"w": torch.zeros(2)}, {}, {"saved_at_ns": 1}
    )
    (newer,) = write_checkpoint(folder, ["last"], {"w": torch.ones(2)}, {}, {"saved_at_ns": 2})
    torn = newer / MODEL_FILE
    content = torn.read_bytes()
    torn.unlink()
    torn.write_bytes(content[:10])
    assert latest_checkpoint(tmp_path) == older


def _as_if_written_by(checkpoint: Path, world_size: int, batch_size: int) -> None:
    meta_file = checkpoint / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["world_size"], meta["config"]["batch_size"] = world_size, batch_size
    meta_file.unlink()  # a hard link shared with other checkpoints: replace it
    meta_file.write_text(json.dumps(meta))
    _rewrite_marker(checkpoint)


def test_another_world_size_needs_the_same_global_batch_and_an_epoch_boundary(
    tmp_path: Path,
) -> None:
    """2 processes x batch 2 == 1 process x batch 4 at an epoch boundary; not mid-epoch, and
    not with another global batch."""
    run_dir = _train(tmp_path)
    epoch = run_dir / "checkpoints" / "epoch-0001"
    _as_if_written_by(epoch, world_size=2, batch_size=2)
    with pytest.raises(CheckpointError, match=r"global batch 4\); this run has 1 with batch_size"):
        _resume(tmp_path, resume=epoch, batch_size=2)
    _resume(tmp_path, resume=epoch, batch_size=4)

    _train(tmp_path / "mid", max_steps=2)
    last = tmp_path / "mid" / "run" / "checkpoints" / "last"
    _as_if_written_by(last, world_size=2, batch_size=2)
    with pytest.raises(CheckpointError, match=r"saved at batch 2 of an epoch by 2 process"):
        _resume(tmp_path / "mid", resume=last, batch_size=4)


def test_resume_without_an_output_folder_trains_on_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    before = _folder_bytes(tmp_path)
    config = EngineConfig(epochs=3, batch_size=4, device="cpu", output_dir=None)
    result = Engine(Standard(OptimizerSpec("Adam", lr=1e-2)), config).fit(
        TinyRegressor(3), data(10), resume=run_dir
    )
    assert (result.steps, result.run_dir) == (9, None)
    assert _folder_bytes(tmp_path) == before

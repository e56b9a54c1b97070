"""The checkpoint format on disk: one directory per checkpoint, written atomically, read safely.

Layout of a run folder (``output_dir/<run-name>/``)::

    checkpoints/
        last/                  the latest save (every save refreshes it)
        epoch-0003/            periodic saves (every N epochs), named by completed epochs
        step-00000120/         periodic saves (every N steps), named by global step
        best-epoch-0002/       the best ``k`` by the monitored metric
            model.pt           model.state_dict(): loadable with plain torch.load
            training.pt        strategy (optimisers, schedulers, counters), GradScaler, progress,
                               metric buffer, RNG states, callback states, history and best value
            meta.json          format version, config, progress, saved_at, monitor value
            COMPLETE           written last: size and sha256 of every other file

Every file is written to a temporary name in the same folder and renamed; a checkpoint is
staged in a hidden folder (``.staging-*``) and renamed into place only once its ``COMPLETE``
marker is written and (``durable``) every file and folder of it is fsynced, so a crash at any
moment leaves each visible checkpoint either complete or untouched. A folder without a valid
marker is never loaded; ``latest_checkpoint`` also passes over one whose files do not match it.

Reading verifies the marker's sizes and hashes before ``torch.load(weights_only=True)``: a
truncated, corrupt or code-carrying file is refused with a ``CheckpointError`` naming it.

Two kinds share this layout and its marker: ``"full"`` (a one-process or DDP run: the files
above) and ``"sharded"`` (an FSDP2 run, ``engine/checkpoint/sharded.py``: the same three files,
``training.pt`` without the optimisers' state, plus a ``shards/`` folder of DCP files; its marker
says ``"kind": "sharded"``). ``latest_checkpoint`` and ``resume="last"`` find both;
``LoadedCheckpoint.kind`` says which one was read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch
from loguru import logger

from engine.errors import CheckpointError

FORMAT_VERSION = 1
MARKER = "COMPLETE"
MODEL_FILE = "model.pt"
TRAINING_FILE = "training.pt"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
LAST = "last"
STAGING_PREFIX = ".staging-"
OLD_PREFIX = ".old-"
FULL = "full"
SHARDED = "sharded"
SHARDS_DIR = "shards"


# ------------------------------------------------------------------ atomic files


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.frozen
class FileRecord:
    """What the ``COMPLETE`` marker remembers of one file."""

    size: int
    sha256: str


def file_record(path: Path) -> FileRecord:
    """Size and sha256 of the file at ``path`` (read back in chunks: just written, it is in the
    page cache)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size, digest.hexdigest())


def write_atomically(
    path: Path, write: Callable[[Path], None], sync_file: bool = True, sync_folder: bool = True
) -> FileRecord:
    """Write ``path`` through ``write(temporary_path)`` into a temporary file of the same
    folder, fsync it, rename it over ``path`` and fsync the folder; return its size and hash.

    ``write`` gets a path, not a handle, so that ``torch.save`` takes its fast native path.
    ``sync_folder=False`` leaves the folder's fsync to the caller (a staging folder is synced
    once, after its last file). Without ``sync_file`` the write still survives the process
    being killed (the rename is atomic), but not a power cut."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        record = file_record(temporary)
        if sync_file:
            _fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    if sync_folder:
        fsync_dir(path.parent)
    return record


def save_torch_file(path: Path, payload: Any, sync: bool = True) -> FileRecord:
    """``torch.save(payload)`` to ``path``, atomically (fsynced, with its folder, if ``sync``)."""
    return write_atomically(path, lambda target: torch.save(payload, str(target)), sync, sync)


def save_json_file(path: Path, payload: Any, sync: bool = True) -> FileRecord:
    """``payload`` as indented JSON to ``path``, atomically (fsynced, with its folder, if
    ``sync``)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8")
    return write_atomically(path, lambda target: _write_bytes(target, text), sync, sync)


# ------------------------------------------------------------------ writing a checkpoint


def write_checkpoint(
    directory: Path,
    names: list[str],
    model_state: Mapping[str, torch.Tensor],
    training_state: Mapping[str, Any],
    meta: Mapping[str, Any],
    durable: bool = True,
) -> list[Path]:
    """Write one checkpoint and install it under each of ``names`` in ``directory``.

    The files are written once into a staging folder; further names get hard links to the same
    files (a copy where links are not supported). Each name is installed by renames only, so an
    existing checkpoint of that name is replaced whole or not at all. ``durable`` fsyncs
    files and folders (all at once, so that the disk can commit them together) before the
    renames, and the folder after them: the save survives a power cut. Without it a checkpoint
    still survives the process being killed at any moment.
    """
    if not names:
        raise CheckpointError(f"write_checkpoint needs at least one name, got {names!r}")
    check_weights_only_payload(training_state, TRAINING_FILE)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.time_ns()}"
    first = directory / f"{STAGING_PREFIX}{names[0]}-{stamp}"
    first.mkdir()
    written = _stage(first, model_state, training_state, meta)
    stagings = [first]
    for name in names[1:]:
        staging = directory / f"{STAGING_PREFIX}{name}-{stamp}"
        _link_folder(first, staging)
        stagings.append(staging)
    if durable:
        fsync_all([first / name for name in written] + stagings)
    replaced = [_install(staging, directory / name) for name, staging in zip(names, stagings)]
    if durable:
        fsync_dir(directory)
    for old in replaced:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_folders(directory)
    return [directory / name for name in names]


def _stage(
    folder: Path,
    model_state: Mapping[str, torch.Tensor],
    training_state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> list[str]:
    """Write the three files of a checkpoint into ``folder``, then its ``COMPLETE`` marker
    (their sizes and hashes); the names written, marker last (nothing fsynced yet)."""

    def save_file(name: str, write: Callable[[Path], None]) -> FileRecord:
        return write_atomically(folder / name, write, sync_file=False, sync_folder=False)

    meta_text = json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, default=str)
    records = {
        MODEL_FILE: save_file(MODEL_FILE, lambda to: torch.save(dict(model_state), str(to))),
        TRAINING_FILE: save_file(
            TRAINING_FILE, lambda to: torch.save(dict(training_state), str(to))
        ),
        META_FILE: save_file(META_FILE, lambda to: _write_bytes(to, meta_text.encode("utf-8"))),
    }
    marker = {
        "format": FORMAT_VERSION,
        "files": {name: attrs.asdict(record) for name, record in records.items()},
    }
    marker_text = json.dumps(marker, indent=2).encode("utf-8")
    save_file(MARKER, lambda to: _write_bytes(to, marker_text))
    return [*records, MARKER]


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def fsync_all(paths: list[Path]) -> None:
    """fsync every file and folder of ``paths`` concurrently (the file system can then commit
    them in one go instead of one after another)."""
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        list(pool.map(_fsync_path, paths))


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_folder(source: Path, target: Path) -> None:
    target.mkdir()
    for entry in source.iterdir():
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)


def _install(staging: Path, final: Path) -> Path | None:
    """Rename a complete staging folder to ``final``; the folder it replaced (moved aside, to
    be removed once the rename is durable), if any."""
    old = None
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}-{time.time_ns()}"
        os.rename(final, old)
    os.rename(staging, final)
    return old


def remove_stale_folders(directory: Path) -> None:
    """Remove staging and replaced folders left by an interrupted save (called after a save
    succeeded, so the checkpoint it installed is newer than any of them)."""
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.startswith((STAGING_PREFIX, OLD_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: its marker first, so a crash midway leaves no half folder that
    looks complete."""
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ what may be saved


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def check_weights_only_payload(value: Any, where: str) -> None:
    """Refuse, before writing, anything ``torch.load(weights_only=True)`` would not read back
    (a callback's state holding an arbitrary object, say), naming where it sits."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; "
                    "checkpoint keys must be str, int, float, bool or None"
                )
            check_weights_only_payload(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            check_weights_only_payload(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__name__} ({value!r:.80}); a checkpoint holds only tensors, "
        "numbers, strings, None and lists/tuples/dicts of them, so that it loads with "
        "torch.load(weights_only=True)"
    )


# ------------------------------------------------------------------ reading a checkpoint


@attrs.frozen
class LoadedCheckpoint:
    """A checkpoint read from disk and verified: its folder, its three parts and its kind
    (``"full"``, or ``"sharded"``: the optimisers' state is in its DCP shards, which
    ``engine/checkpoint/sharded.py`` loads into the run; ``model_state`` is then memory-mapped
    from its full-state ``model.pt``)."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    kind: str = FULL

    @property
    def run_dir(self) -> Path | None:
        """The run folder this checkpoint belongs to, if it lies in one's ``checkpoints/``."""
        parent = self.path.parent
        return parent.parent if parent.name == CHECKPOINTS_DIR else None


def checkpoint_kind(marker: Mapping[str, Any]) -> str:
    """``"full"`` or ``"sharded"``: what a marker says its checkpoint is."""
    return SHARDED if marker.get("kind") == SHARDED else FULL


def read_marker(path: Path) -> dict[str, Any]:
    """The parsed ``COMPLETE`` marker of checkpoint ``path`` (either kind); a missing or bad one
    is an error."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {MARKER} marker (its save was "
            "interrupted); resume from a complete checkpoint"
        )
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = marker["files"]
        version = marker["format"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint marker {marker_path} is corrupt: {error}") from error
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this engine reads version "
            f"{FORMAT_VERSION}"
        )
    expected = {MODEL_FILE, TRAINING_FILE, META_FILE}
    kind = marker.get("kind", FULL)
    if kind not in (FULL, SHARDED):
        raise CheckpointError(f"checkpoint marker {marker_path} names an unknown kind {kind!r}")
    listed_files = set(files) if isinstance(files, dict) else set()
    if kind == SHARDED:  # the three files and DCP's shards, nothing else
        listed_files = {n for n in listed_files if not n.startswith(f"{SHARDS_DIR}/")}
    if not isinstance(files, dict) or listed_files != expected:
        listed = sorted(files) if isinstance(files, dict) else files
        raise CheckpointError(
            f"checkpoint marker {marker_path} lists files {listed!r}; expected {sorted(expected)}"
            + (f" and {SHARDS_DIR}/*" if kind == SHARDED else "")
        )
    return marker


def _verified_bytes(path: Path, record: Mapping[str, Any]) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if len(data) != record.get("size"):
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt: {len(data)} bytes, its marker "
            f"records {record.get('size')}"
        )
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its sha256 differs from the one its marker records"
        )
    return data


def load_torch_file(path: Path, data: bytes | None = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU (``mmap``: the file's tensors mapped, not
    read); refusals become ``CheckpointError``."""
    source: Any = io.BytesIO(data) if data is not None else path
    try:
        if mmap and data is None:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "weights_only" in text or "Unsupported" in text or "global" in text.lower():
            raise CheckpointError(
                f"checkpoint file {path} is refused: it holds objects that could run code when "
                f"loaded (only tensors and plain containers load with weights_only=True): "
                f"{text.splitlines()[0] if text else type(error).__name__}"
            ) from error
        raise CheckpointError(
            f"checkpoint file {path} can not be read ({type(error).__name__}: {text[:200]})"
        ) from error


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and verify checkpoint folder ``path`` (marker, sizes, hashes, weights-only load).
    A sharded checkpoint's files are all verified first (its shards too, read in chunks); its
    ``model.pt`` is memory-mapped rather than read (every rank of an FSDP run reads it, for the
    checks before loading)."""
    path = Path(path)
    marker = read_marker(path)
    files = marker["files"]
    if checkpoint_kind(marker) == SHARDED:
        return _load_sharded_parts(path, marker)
    try:
        meta = json.loads(_verified_bytes(path / META_FILE, files[META_FILE]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path / META_FILE} is not JSON: {error}") from error
    model_state = load_torch_file(
        path / MODEL_FILE, _verified_bytes(path / MODEL_FILE, files[MODEL_FILE])
    )
    training_state = load_torch_file(
        path / TRAINING_FILE, _verified_bytes(path / TRAINING_FILE, files[TRAINING_FILE])
    )
    return _checked(path, meta, model_state, training_state, FULL)


def _load_sharded_parts(path: Path, marker: Mapping[str, Any]) -> LoadedCheckpoint:
    """A sharded checkpoint's meta, training state and (memory-mapped) full model state, once
    every file of it matches its marker."""
    for name, record in marker["files"].items():
        _verify_file(path / name, record)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path / META_FILE} is not JSON: {error}") from error
    model_state = load_torch_file(path / MODEL_FILE, mmap=True)
    training_state = load_torch_file(path / TRAINING_FILE)
    return _checked(path, meta, model_state, training_state, SHARDED)


def _checked(path: Path, meta: Any, model: Any, training: Any, kind: str) -> LoadedCheckpoint:
    """The loaded parts of checkpoint ``path``, each of the type a checkpoint holds."""
    for name, value in ((MODEL_FILE, model), (TRAINING_FILE, training)):
        if not isinstance(value, dict):
            raise CheckpointError(
                f"checkpoint file {path / name} holds a {type(value).__name__}, not a dict"
            )
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {path / META_FILE} holds no JSON object")
    return LoadedCheckpoint(path, meta, model, training, kind)


# ------------------------------------------------------------------ finding checkpoints


def complete_checkpoints(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each folder of ``directory`` (staging ones included) with a readable marker and meta,
    with its meta; incomplete folders are skipped."""
    if not directory.is_dir():
        return
    for entry in sorted(directory.iterdir()):
        if not entry.is_dir() or not (entry / MARKER).is_file():
            continue
        try:
            read_marker(entry)
            meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError):
            continue
        if isinstance(meta, dict):
            yield entry, meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently saved checkpoint of a run folder whose files match its marker (hidden
    staging folders included: a crash between the renames of a save leaves its checkpoint
    there), or None. A newer one that does not verify (a power cut during its save) is passed
    over for the one before it."""
    found = list(complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR))
    # One save installed under several names shares its time: prefer ``last`` among them.
    found.sort(key=lambda item: (int(item[1].get("saved_at_ns", 0)), item[0].name == LAST))
    for path, _ in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning(f"passing over checkpoint {path}: {error}")
            continue
        return path
    return None


def verify_checkpoint(path: Path) -> None:
    """Check that every file of checkpoint ``path`` has the size and hash its marker records
    (a sharded checkpoint's read in chunks: its shards can be large)."""
    marker = read_marker(path)
    sharded = checkpoint_kind(marker) == SHARDED
    for name, record in marker["files"].items():
        if sharded:
            _verify_file(path / name, record)
        else:
            _verified_bytes(path / name, record)


def _verify_file(path: Path, record: Mapping[str, Any]) -> None:
    """``path`` has the size and sha256 of ``record``, read in chunks."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    found = file_record(path)
    if found.size != record.get("size"):
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt: {found.size} bytes, its marker "
            f"records {record.get('size')}"
        )
    if found.sha256 != record.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its sha256 differs from the one its marker records"
        )


def resolve_resume(
    resume: str | os.PathLike[str], output_dir: Path | None, run_name: str | None
) -> Path:
    """The checkpoint folder ``resume`` names: ``"last"`` (the latest checkpoint of
    ``output_dir/run_name``), a checkpoint folder, or a run folder (its latest checkpoint)."""
    if isinstance(resume, str) and resume == LAST:
        if output_dir is None or run_name is None:
            raise CheckpointError(
                "resume='last' continues the run folder output_dir/run_name; it needs both, got "
                f"output_dir={output_dir!r}, run_name={run_name!r}"
            )
        run_dir = output_dir / run_name
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(
                f"resume='last': no complete checkpoint under {run_dir / CHECKPOINTS_DIR}"
            )
        return found
    if not isinstance(resume, (str, os.PathLike)):
        raise CheckpointError(
            f"resume must be 'last', a checkpoint folder or a run folder, got {resume!r}"
        )
    path = Path(resume)
    if (path / MARKER).exists() or (path / MODEL_FILE).exists():
        return path
    if (path / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"resume={str(path)!r}: run folder has no complete checkpoint under "
                f"{path / CHECKPOINTS_DIR}"
            )
        return found
    raise CheckpointError(
        f"resume={str(path)!r} is neither 'last', a checkpoint folder (with {MARKER}) nor a run "
        f"folder (with {CHECKPOINTS_DIR}/)"
    )

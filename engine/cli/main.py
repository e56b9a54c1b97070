"""The command line: ``strategy-engine fit|resume|evaluate|predict|export-pythae`` (also
``python -m engine``).

This module parses the arguments and reports the outcome; what each command does is in
``engine/cli/commands.py``, imported only once a command runs (so ``--help`` loads no torch
from here). Every error of the project's own types (``engine.errors``: a bad config, bad data,
a refused checkpoint, a name the run does not produce...) is printed as one line, ``error:
...``, without a traceback, and the exit code is 2. Ctrl-C prints one line saying where the run
stopped and how to resume it, with exit code 130. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

# Names tests and scripts import from here; they live in ``engine.cli.commands``.
_COMMAND_NAMES = frozenset(
    {
        "build",
        "load_run_config",
        "fit",
        "resume",
        "evaluate",
        "predict",
        "export_pythae",
        "RunFiles",
    }
)


def __getattr__(name: str) -> Any:
    """``engine.cli.main.build`` and the like, from ``engine.cli.commands`` on first use."""
    if name in _COMMAND_NAMES:
        from engine.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strategy-engine",
        description="Train, resume, evaluate and predict with strategy-engine from a config file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set engine.epochs=5 (repeatable)",
    )
    overrides.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (torch.set_num_threads); 1 is fastest for small models "
        "on a busy machine. Default: torch's choice",
    )
    fit_parser = commands.add_parser("fit", parents=[overrides], help="train from a config")
    fit_parser.add_argument("config", help="a .toml or .json run config")
    resume_parser = commands.add_parser(
        "resume", parents=[overrides], help="continue a run from its last checkpoint"
    )
    resume_parser.add_argument("run_dir", help="the run folder to continue")
    for name, text in (("evaluate", "print eval losses"), ("predict", "save model outputs")):
        command = commands.add_parser(name, parents=[overrides], help=text)
        command.add_argument("target", help="a run folder, or a config file with --weights")
        command.add_argument("--weights", help="a state dict file (default RUN/model_final.pt)")
        command.add_argument("--split", default="eval", choices=["train", "eval"])
        if name == "predict":
            command.add_argument("--output", help="where to save (default RUN/predictions.pt)")
    export_parser = commands.add_parser(
        "export-pythae",
        parents=[overrides],
        help="save a [pythae] run's latest checkpoint as a pythae model folder",
    )
    export_parser.add_argument("run_dir", help="the run folder of a [pythae] config")
    export_parser.add_argument("folder", help="the folder to write (AutoModel.load_from_folder)")
    return parser


def _print_run_folder(run_dir: Path | None) -> None:
    if run_dir is None:
        print("no run folder (engine.output_dir is unset)")
        return
    print(f"run folder: {run_dir}")
    for path in sorted(run_dir.iterdir()):
        for entry in sorted(path.iterdir()) if path.is_dir() else [path]:
            files = [f for f in entry.rglob("*") if f.is_file()] if entry.is_dir() else [entry]
            size = sum(f.stat().st_size for f in files)
            name = entry.relative_to(run_dir).as_posix() + ("/" if entry.is_dir() else "")
            count = f"{len(files)} files, " if entry.is_dir() else ""
            print(f"  {name}  ({count}{size:,} bytes)")


def _run(args: argparse.Namespace) -> None:
    """Run the command; only the main process prints (every rank runs it under torchrun)."""
    from engine.cli import commands
    from engine.distributed.collectives import current_world

    if args.threads is not None:
        from engine.config.validators import positive_int

        positive_int.require("--threads", args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args.command in ("fit", "resume"):
        if args.command == "fit":
            result = commands.fit(args.config, args.overrides)
        else:
            result = commands.resume(args.run_dir, args.overrides)
        if current_world().is_main:
            _print_result(result, show_best=args.command == "fit")
    elif args.command == "export-pythae":
        folder = commands.export_pythae(args.run_dir, args.folder, args.overrides)
        if current_world().is_main:
            print(f"pythae model folder: {folder}")
    elif args.command == "evaluate":
        metrics = commands.evaluate(args.target, args.overrides, args.weights, args.split)
        if current_world().is_main:
            print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        path = commands.predict(args.target, args.output, args.overrides, args.weights, args.split)
        if current_world().is_main:
            print(f"predictions: {path}")


def _print_result(result: Any, show_best: bool) -> None:
    if show_best and result.best_value is not None and result.best_epoch is not None:
        print(f"best {result.monitor} = {result.best_value:.4g} at epoch {result.best_epoch + 1}")
    _print_run_folder(result.run_dir)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``strategy-engine`` and ``python -m engine``; returns the exit code.

    Import paths in a config resolve from the current directory, as under ``python -m``."""
    args = _parser().parse_args(argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from engine import errors
    from engine.cli.commands import Interrupted

    try:
        _run(args)
    except errors.OUR_ERRORS as error:
        print("error: " + _one_line(str(error)), file=sys.stderr)
        return USAGE_ERROR
    except Interrupted as interrupted:
        print(_one_line(str(interrupted)), file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:  # outside a run (building the model, reading the data)
        print("interrupted before the first step", file=sys.stderr)
        return INTERRUPTED
    return 0

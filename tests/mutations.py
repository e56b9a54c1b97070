"""Break each guarantee on purpose, one at a time, and check that its tests fail.

``python tests/mutations.py`` (``make mutation-check``) copies the repository (without
``.venv``, ``.git`` and caches) to a scratch folder, checks that the named tests pass there
unbroken, then for each ``Mutation`` replaces its exact snippets in the scratch copy, runs its
tests with this interpreter's pytest (``PYTHONPATH`` set to the scratch copy, so that its
packages are imported, not those of the editable install: checked first), and restores the
files. A mutation whose tests all pass *survived*: its guarantee is not tested. A snippet not
found is an *error* (the code moved: update the mutation), never counted as killed.

``--only NAME...`` runs some; ``--list`` lists them; ``--jobs`` is 1 (the 2-process tests share
the machine's cores). Exit code: 0 when every mutation was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[1]
IGNORED = (".venv", ".git", "runs", ".hypothesis", ".mypy_cache", ".pytest_cache", "__pycache__")
TIMEOUT_S = 1200


@attrs.frozen
class Mutation:
    """One deliberate break: ``edits`` are ``(file, old snippet, new snippet)``, each old snippet
    found exactly once; ``tests`` are pytest node ids of which at least one must fail."""

    name: str
    guarantee: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


def _m(name: str, guarantee: str, edits: Sequence[tuple[str, str, str]], *tests: str) -> Mutation:
    return Mutation(name, guarantee, tuple(edits), tuple(tests))


ISOLATION = "tests/strategies/test_isolation.py"
DIST = "tests/engine/test_distributed.py"
RESUME = "tests/engine/test_checkpoint_resume.py"
CKPT = "tests/engine/test_checkpoint.py"
DURABLE = "tests/engine/test_checkpoint_durable.py"
SYNC = "tests/engine/test_sync_free.py"
LOOP = "tests/engine/test_loop.py"
# The line of Standard's step that both its paths (plain and full) run.
STANDARD_STEP = (
    "        metrics = {self.loss_key: loss.detach()}  # before the backward: see joint.py\n"
)
PHASE_BACKWARD = (
    "                backward_isolated([(update, terms.total(phase, ctx))], ctx, sync=sync)\n"
)

MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------- isolation
    _m(
        "backward-without-inputs",
        "isolation: each loss reaches its own group only",
        [
            (
                "strategies/update.py",
                "        loss.backward(inputs=params, retain_graph=retain)\n",
                "        loss.backward(retain_graph=retain)\n",
            )
        ],
        ISOLATION,
    ),
    _m(
        "off-update-still-backpropagated",
        "an update that is off changes nothing",
        [
            (
                "strategies/joint.py",
                "            if step is None or not (step.flag and step.scheduled):",
                "            if step is None:",
            ),
        ],
        "tests/strategies/test_off_updates.py",
        ISOLATION,
    ),
    _m(
        "present-flag-taken-as-absent",
        "an update that is off changes nothing (a flag the forward returns is read)",
        [
            (
                "strategies/joint.py",
                "                if flag is not True:\n                    unread[role] = flag\n",
                "",
            ),
        ],
        "tests/strategies/test_off_updates.py",
    ),
    # ---------------------------------------------------------------- accumulation
    _m(
        "no-accumulation-divisor",
        "accumulation of k batches equals one batch k times larger",
        [
            (
                "strategies/update.py",
                "        loss = loss / ctx.micro_count\n",
                "        loss = loss\n",
            )
        ],
        "tests/strategies/test_standard.py::test_k_micro_batches_equal_one_batch_k_times_larger",
    ),
    _m(
        "short-window-divided-by-k",
        "a short last window is stepped with its own size as divisor",
        [
            (
                "engine/data/windows.py",
                "counts = chain(repeat(k, full), repeat(total - last_start, short))",
                "counts = repeat(k)",
            )
        ],
        "tests/strategies/test_standard.py::test_a_short_last_window_is_the_mean_of_its_own_micro_batches",
    ),
    # ---------------------------------------------------------------- exact resume
    _m(
        "rng-not-restored",
        "exact resume: every random stream continues",
        [("engine/checkpoint/state.py", '        set_rng_states(own["rng"])\n', "")],
        f"{RESUME}::test_resumed_run_continues_the_random_streams",
    ),
    _m(
        "optimizer-state-not-restored",
        "exact resume: optimiser states continue",
        [
            (
                "engine/checkpoint/state.py",
                "        ctx.scaler.load_state_dict(scaler_state)\n",
                "        pass\n",
            )
        ],
        f"{RESUME}::test_fp16_resume_restores_the_grad_scaler",
    ),
    _m(
        "metric-buffer-not-restored",
        "exact resume: the history of a mid-epoch resume is the uninterrupted one",
        [
            (
                "engine/checkpoint/state.py",
                "            run.metric_buffer.load_state_dict(buffer_state, device)\n",
                "            pass\n",
            )
        ],
        f"{RESUME}::test_mid_epoch_resume_of_data_gathered_per_batch_replays_no_batch",
        f"{RESUME}::test_resumed_run_equals_uninterrupted_run",
    ),
    _m(
        "mid-epoch-restart-from-zero",
        "exact resume mid-epoch: no batch replayed",
        [
            (
                "engine/loop.py",
                "train_batches.epoch(epoch, start=first)",
                "train_batches.epoch(epoch)",
            )
        ],
        f"{RESUME}::test_mid_epoch_resume_of_data_gathered_per_batch_replays_no_batch",
    ),
    _m(
        "large-data-path-replays-batches",
        "the >512 MiB in-memory path does not replay batches after a mid-epoch resume",
        [
            (
                "engine/data/batches.py",
                "        return _gathered(self.template, self.leaves, order, bounds)",
                "        return _gathered(self.template, self.leaves, order, self.bounds)",
            )
        ],
        "tests/engine/test_data.py::test_both_in_memory_paths_give_the_same_batches_and_restart_where_asked",
        f"{RESUME}::test_mid_epoch_resume_of_data_gathered_per_batch_replays_no_batch",
    ),
    # ---------------------------------------------------------------- compatibility refusals
    _m(
        "compatibility-check-batch-size-only",
        "a resume with another seed, shuffle, drop_last or accumulate_steps is refused",
        [
            (
                "engine/checkpoint/state.py",
                'SAME_RUN_FIELDS = ("seed", "batch_size", "shuffle", "drop_last", '
                '"accumulate_steps")',
                'SAME_RUN_FIELDS = ("batch_size",)',
            )
        ],
        f"{CKPT}::test_a_changed_data_order_is_refused_naming_the_field",
    ),
    _m(
        "no-dtype-check",
        "a checkpoint of another dtype is refused",
        [
            (
                "engine/checkpoint/state.py",
                "if other.shape != value.shape or other.dtype != value.dtype:",
                "if other.shape != value.shape:",
            )
        ],
        f"{CKPT}::test_a_foreign_model_state_is_our_error_naming_the_keys_or_dtypes",
    ),
    _m(
        "no-missing-unexpected-keys-check",
        "a foreign checkpoint is our CheckpointError, not a raw KeyError",
        [("engine/checkpoint/state.py", "    if missing or unexpected:\n", "    if False:\n")],
        f"{CKPT}::test_a_foreign_model_state_is_our_error_naming_the_keys_or_dtypes",
    ),
    _m(
        "no-strategy-check",
        "a checkpoint of another strategy is refused",
        [("engine/checkpoint/state.py", "    if saved_name != name:\n", "    if False:\n")],
        f"{CKPT}::test_a_foreign_strategy_is_refused",
    ),
    _m(
        "no-precision-check",
        "a checkpoint of another precision is refused",
        [
            (
                "engine/checkpoint/state.py",
                "    if (scaler_state is None) != (ctx.scaler is None):\n",
                "    if False:\n",
            )
        ],
        f"{CKPT}::test_a_changed_precision_is_refused",
    ),
    _m(
        "no-global-batch-check",
        "another world size needs the same global batch, at an epoch boundary",
        [
            (
                "engine/checkpoint/state.py",
                "    if saved_global != global_batch:\n",
                "    if False:\n",
            ),
        ],
        f"{CKPT}::test_another_world_size_needs_the_same_global_batch_and_an_epoch_boundary",
    ),
    # ---------------------------------------------------------------- safe loading
    _m(
        "weights-only-off",
        "safe loading: a checkpoint can not run code",
        [
            (
                "engine/checkpoint/format.py",
                'torch.load(source, map_location="cpu", weights_only=True)',
                'torch.load(source, map_location="cpu", weights_only=False)',
            )
        ],
        f"{CKPT}::test_a_pickle_payload_that_would_run_code_is_refused",
    ),
    _m(
        "no-hash-check",
        "safe loading: a corrupt file is refused",
        [
            (
                "engine/checkpoint/format.py",
                '    if hashlib.sha256(data).hexdigest() != record.get("sha256"):\n',
                "    if False:\n",
            )
        ],
        f"{CKPT}::test_a_flipped_byte_is_refused_as_corrupt",
    ),
    _m(
        "no-size-check",
        "safe loading: a truncated file is refused naming it",
        [
            (
                "engine/checkpoint/format.py",
                '    if len(data) != record.get("size"):\n',
                "    if False:\n",
            )
        ],
        f"{CKPT}::test_a_truncated_file_is_refused_naming_it",
    ),
    _m(
        "no-marker-check",
        "atomic: a folder without its COMPLETE marker is never loaded",
        [("engine/checkpoint/format.py", "    if not marker_path.is_file():\n", "    if False:\n")],
        f"{CKPT}::test_a_folder_without_marker_is_refused_and_ignored",
    ),
    _m(
        "unsaveable-state-written",
        "a state that would not load weights-only is refused before writing",
        [
            (
                "engine/checkpoint/format.py",
                "    check_weights_only_payload(training_state, TRAINING_FILE)\n",
                "",
            )
        ],
        f"{CKPT}::test_state_that_would_not_load_weights_only_is_refused_before_writing",
    ),
    # ---------------------------------------------------------------- atomic, durable saves
    _m(
        "no-fsync-in-durable-save",
        "durable: files and folders are fsynced before the rename",
        [
            (
                "engine/checkpoint/format.py",
                "        fsync_all([first / name for name in written] + stagings)\n",
                "        pass\n",
            )
        ],
        f"{DURABLE}::test_a_durable_save_fsyncs_each_file_and_folder_before_it_becomes_visible",
    ),
    _m(
        "no-fsync-of-exports",
        "durable: exported files are fsynced before their rename",
        [
            (
                "engine/checkpoint/format.py",
                "            _fsync_path(temporary)\n",
                "            pass\n",
            )
        ],
        f"{DURABLE}::test_a_durable_save_fsyncs_each_file_and_folder_before_it_becomes_visible",
        f"{DURABLE}::test_a_durable_file_write_fsyncs_the_file_before_its_rename_and_the_folder_after",
    ),
    _m(
        "write-in-place",
        "atomic: a file is written under a temporary name and renamed",
        [
            (
                "engine/checkpoint/format.py",
                '    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")\n',
                "    temporary = path\n",
            )
        ],
        f"{DURABLE}::test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary",
    ),
    _m(
        "staging-folders-ignored",
        "atomic: a save killed between its renames leaves a loadable checkpoint",
        [
            (
                "engine/checkpoint/format.py",
                "        if not entry.is_dir() or not (entry / MARKER).is_file():\n",
                "        if entry.name.startswith('.') or not (entry / MARKER).is_file():\n",
            )
        ],
        f"{DURABLE}::test_a_save_interrupted_at_any_file_operation_leaves_a_loadable_checkpoint",
        f"{CKPT}::test_a_save_killed_between_its_renames_leaves_a_loadable_checkpoint",
    ),
    _m(
        "torn-checkpoint-not-passed-over",
        "resume='last' passes over a newer checkpoint torn by a power cut",
        [
            (
                "engine/checkpoint/format.py",
                "            verify_checkpoint(path)\n",
                "            pass\n",
            )
        ],
        f"{CKPT}::test_a_newer_checkpoint_torn_by_a_power_cut_is_passed_over",
    ),
    # ---------------------------------------------------------------- evaluation
    _m(
        "evaluation-without-fork-rng",
        "evaluation changes no RNG stream of training",
        [
            (
                "engine/evaluation.py",
                "with torch.random.fork_rng(devices=devices), grad:",
                "with grad:",
            )
        ],
        LOOP,
    ),
    _m(
        "evaluation-leaves-eval-mode",
        "evaluation restores the model's training mode",
        [("engine/evaluation.py", "            model.train(was_training)\n", "            pass\n")],
        LOOP,
    ),
    _m(
        "evaluation-never-enters-eval-mode",
        "evaluation runs the model in eval mode (BatchNorm statistics untouched)",
        [("engine/evaluation.py", "        model.eval()\n", "        pass\n")],
        LOOP,
    ),
    _m(
        "evaluation-trains",
        "evaluation changes no parameter or optimiser state",
        [
            (
                "strategies/standard.py",
                "        outputs = ctx.forward(model, batch)\n        metrics = {",
                "        with torch.enable_grad():\n"
                "            return self.train_step(model, batch, ctx)\n"
                "        outputs = ctx.forward(model, batch)\n        metrics = {",
            )
        ],
        LOOP,
    ),
    _m(
        "evaluation-weighted-per-batch",
        "evaluation weighs every sample equally",
        [
            (
                "engine/evaluation.py",
                "weighted = value.detach().double() * size",
                "weighted = value.detach().double()",
            ),
            ("engine/evaluation.py", "            samples += size\n", "            samples += 1\n"),
        ],
        f"{LOOP}::test_evaluate_weights_every_sample_equally",
    ),
    # ---------------------------------------------------------------- host syncs
    _m(
        "standard-step-copies-loss-to-host",
        "zero host syncs per step (Standard)",
        [
            (
                "strategies/standard.py",
                STANDARD_STEP,
                '        loss.detach().to("cpu")\n' + STANDARD_STEP,
            )
        ],
        SYNC,
    ),
    _m(
        "standard-step-is-nonzero",
        "zero host syncs per step (Standard)",
        [
            (
                "strategies/standard.py",
                STANDARD_STEP,
                "        torch.is_nonzero(loss.detach() > 0)\n" + STANDARD_STEP,
            )
        ],
        SYNC,
    ),
    _m(
        "multi-loss-step-reads-a-loss",
        "zero host syncs per step (Adversarial, Coupled, CoupledAdversarial)",
        [
            (
                "strategies/joint.py",
                "    steps = joint.read(outputs, ctx)\n",
                "    steps = joint.read(outputs, ctx)\n"
                "    [bool(step.loss.detach().isnan()) for step in steps.values()]\n",
            )
        ],
        f"{SYNC}::test_a_training_step_reads_nothing_on_the_host",
    ),
    _m(
        "sequential-phase-reads-its-loss",
        "zero host syncs per step (two-phase sequential Adversarial)",
        [
            (
                "strategies/phase_runner.py",
                PHASE_BACKWARD,
                "                terms.total(phase, ctx).detach().tolist()\n" + PHASE_BACKWARD,
            )
        ],
        f"{SYNC}::test_a_training_step_reads_nothing_on_the_host",
    ),
    _m(
        "metrics-read-every-step",
        "metrics are read once per log interval, not per step",
        [("engine/loop.py", "at_log = progress.step % log_every == 0", "at_log = True")],
        f"{SYNC}::test_a_fit_with_twice_the_steps_reads_nothing_more",
    ),
    # ---------------------------------------------------------------- data
    _m(
        "prefetch-copies-blocking",
        "prefetch copies are non_blocking, on the side stream",
        [
            (
                "engine/data/prefetch.py",
                "moved = move_to_device(batch, device, non_blocking=True)",
                "moved = move_to_device(batch, device, non_blocking=False)",
            )
        ],
        "tests/engine/test_prefetch.py",
    ),
    _m(
        "same-shuffle-every-epoch",
        "the shuffle changes every epoch",
        [
            (
                "engine/data/batches.py",
                "torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)",
                "torch.Generator().manual_seed(seed * _SEED_STRIDE)",
            )
        ],
        "tests/engine/test_data.py::test_shuffle_is_reproducible_and_changes_per_epoch",
    ),
    # ---------------------------------------------------------------- several processes
    _m(
        "no-initial-broadcast",
        "ranks never diverge (rank 0's parameters at the start)",
        [("engine/run_setup.py", "    broadcast_module(model, world)\n", "    pass\n")],
        f"{DIST}::test_ranks_stay_identical_and_match_one_process_with_the_global_batch",
    ),
    _m(
        "no-closing-barrier",
        "fit returns on every rank with rank 0's files on disk",
        [
            (
                "engine/distributed/session.py",
                '        collective("the closing barrier", world, dist.barrier)\n',
                "        pass\n",
            )
        ],
        f"{DIST}::test_fit_returns_on_every_rank_only_once_rank_zeros_files_are_on_disk",
    ),
    _m(
        "no-distributed-timeout",
        "a hung rank is bounded by distributed_timeout_s",
        [
            (
                "engine/distributed/session.py",
                "            timeout=datetime.timedelta(seconds=timeout_s),\n",
                "",
            )
        ],
        f"{DIST}::test_a_hung_rank_is_bounded_by_the_distributed_timeout",
    ),
    _m(
        "predict-on-own-shard",
        "predict covers all the data on every rank",
        [
            (
                "engine/loop.py",
                "ctx = standalone_context(self.config, model, World(), self.forward)",
                "ctx = standalone_context(self.config, model, current_world(), self.forward)",
            )
        ],
        f"{DIST}::test_predict_covers_all_the_data_on_every_rank",
    ),
    _m(
        "group-held-by-torch",
        "no gloo thread outlives leave_process_group (no abort at exit)",
        [
            (
                "engine/distributed/session.py",
                "    for name in _BINDS_THE_GROUP_AT_IMPORT:\n"
                "        importlib.import_module(name)\n",
                "",
            )
        ],
        f"{DIST}::test_leaving_joins_gloo_threads_when_the_optimiser_is_built_after_joining",
    ),
    _m(
        "only-rank-zero-writes-off",
        "side effects on rank 0 only",
        [
            (
                "engine/run_setup.py",
                "if config.output_dir is not None and world.is_main:",
                "if config.output_dir is not None:",
            )
        ],
        f"{DIST}::test_only_rank_zero_writes_files",
    ),
    # ---------------------------------------------------------------- schedulers, CLI
    _m(
        "plateau-scheduler-ignores-its-metric",
        "ReduceLROnPlateau reads the metric it monitors",
        [
            (
                "strategies/update.py",
                "            update.scheduler.step(metrics[monitor])\n",
                "            update.scheduler.step(0.0)\n",
            )
        ],
        "tests/strategies/test_standard.py::test_plateau_scheduler_reads_its_monitored_metric",
    ),
    _m(
        "cli-error-two-lines",
        "a bad config is one 'error:' line, exit code 2",
        [
            (
                "engine/cli/main.py",
                '        print("error: " + _one_line(str(error)), file=sys.stderr)\n',
                '        print("error: " + str(error) + "\\n(see above)", file=sys.stderr)\n',
            )
        ],
        "tests/engine/test_cli.py::test_malformed_configs_fail_with_our_error_before_training",
    ),
    # ---------------------------------------------------------------- hot path (issue 16)
    _m(
        "compiled-step-not-told",
        "compile='step' equals eager (its optimiser steps run between graphs)",
        [
            (
                "engine/run_setup.py",
                '        compiled_step=config.compile == "step",\n',
                "        compiled_step=False,\n",
            ),
        ],
        "tests/engine/test_compile_step.py",
    ),
    _m(
        "plain-step-where-clipping-asks",
        "a step clips when the config asks (clipping takes the full path)",
        [("strategies/update.py", "        and ctx.grad_clip_norm is None\n", "")],
        "tests/strategies/test_plain_step.py",
        "tests/strategies/test_standard.py::test_clipping_matches_a_clipped_sgd_step",
    ),
    _m(
        "plain-step-keeps-gradients",
        "a plain step trains as the full path does (it zeroes the gradients it stepped)",
        [
            (
                "strategies/standard.py",
                "            update.optimizer.zero_grad(set_to_none=True)\n",
                "",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "joint-plain-step-keeps-gradients",
        "a multi-role plain step trains as the full path does (it zeroes what it stepped)",
        [
            (
                "strategies/joint.py",
                "        update.optimizer.zero_grad(set_to_none=True)\n    joint._windows += 1",
                "    joint._windows += 1",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "joint-plain-step-ignores-flags",
        "a multi-role plain step leaves an update its forward switched off alone",
        [
            (
                "strategies/joint.py",
                "        if not flags.get(role, True) or (role in intervals",
                "        if (role in intervals",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "joint-plain-step-ignores-schedule",
        "a multi-role plain step keeps a role's schedule (and counts its windows)",
        [("strategies/joint.py", "    joint._windows += 1  # a window", "    pass  # a window")],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "joint-plain-step-drops-extra-metrics",
        "a multi-role plain step logs the extra metrics the strategy names",
        [
            (
                "strategies/joint.py",
                "        metrics.update(joint.step_metrics({}, outputs, ctx))",
                "        pass",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "joint-plain-step-never-taken",
        "a plain multi-role step runs the fused plain path, not the full one",
        [
            (
                "strategies/joint.py",
                "    if joint._plain and ctx.micro_count == 1:\n        return _train_plain",
                "    if False:\n        return _train_plain",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "plain-step-never-taken",
        "a step that asks for nothing more calls backward and the optimiser step directly",
        [
            (
                "strategies/standard.py",
                "        if self._plain and ctx.micro_count == 1:",
                "        if False:",
            )
        ],
        "tests/strategies/test_plain_step.py",
    ),
    _m(
        "traced-gradients-of-off-updates-kept",
        "under compile='step' an update its device-tensor flag switches off changes nothing",
        [
            (
                "strategies/joint.py",
                "                step = steps.get(update.spec.role)\n"
                "                if step is None or not (step.flag and step.scheduled):"
                "  # not step.active: a call\n"
                "                    continue\n"
                "                if gradients is not None:\n",
                "                step = steps.get(update.spec.role)\n"
                "                if gradients is not None:\n",
            ),
        ],
        "tests/engine/test_compile_step.py",
    ),
    _m(
        "flagged-step-backwards-left-to-autograd",
        "under compile='step' flags as device tensors keep the backwards in the forward's graph",
        [
            (
                "strategies/joint.py",
                "        if joint.can_trace_gradients(ctx):\n",
                "        if False:\n",
            ),
        ],
        "tests/engine/test_compile_step.py",
    ),
    _m(
        "accumulators-not-held",
        "a step reuses the gradient accumulators its updates hold",
        [
            (
                "strategies/update.py",
                "    update.accumulators = held_accumulators(update.params)\n",
                "    held_accumulators(update.params)\n",
            )
        ],
        "tests/strategies/test_accumulators.py",
    ),
    _m(
        "flush-reads-columns-wrong",
        "a flush of steps with the same keys gives each key the mean of its own values",
        [
            (
                "engine/metrics.py",
                "columns = stacked.float().view(len(entries), len(keys)).t()",
                "columns = stacked.float().view(len(keys), len(entries))",
            )
        ],
        "tests/engine/test_hot_path.py",
    ),
    _m(
        "seed-misses-torch",
        "seed_everything draws as torch.manual_seed does",
        [
            (
                "engine/seeding.py",
                "    torch.default_generator.manual_seed(seed)\n",
                "    torch.default_generator.manual_seed(seed + 1)\n",
            )
        ],
        "tests/engine/test_seeding.py",
    ),
    _m(
        "phase-record-frozen",
        "compile='step' traces a sequential phase's forward and backward as one graph",
        [
            (
                "strategies/phase_runner.py",
                "@attrs.define(eq=False)  # not frozen: torch.compile cannot trace a frozen attrs",
                "@attrs.frozen  # not frozen: torch.compile cannot trace a frozen attrs",
            )
        ],
        "tests/engine/test_compile_step.py::test_forward_and_backwards_are_one_graph",
    ),
)


# ------------------------------------------------------------------ running


def scratch_copy(destination: Path) -> Path:
    """The repository copied to ``destination/repo`` without the virtual environment, git and
    caches; returns the copy."""
    target = destination / "repo"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*IGNORED))
    return target


def _environment(repo: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(repo),
        "PYTHONDONTWRITEBYTECODE": "1",  # no stale bytecode between two mutations of a file
    }


def check_imports_from(repo: Path) -> str:
    """Fail unless the scratch copy's packages are imported (not the editable install's)."""
    code = "import engine, strategies, callbacks; print(engine.__file__, strategies.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env=_environment(repo),
        capture_output=True,
        text=True,
        check=True,
    )
    imported = done.stdout.strip()
    if not all(path.startswith(str(repo)) for path in imported.split()):
        raise SystemExit(f"the scratch copy imports {imported}, not its own packages under {repo}")
    return imported


def run_tests(repo: Path, tests: Sequence[str]) -> tuple[int, str, float]:
    """pytest on ``tests`` in ``repo``: exit code, the tail of its output, seconds."""
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command,
            cwd=repo,
            env=_environment(repo),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s", time.monotonic() - started
    lines = (done.stdout + done.stderr).strip().splitlines()
    errors = [line for line in lines if line.startswith("E ")][:3]
    return done.returncode, " | ".join(errors + lines[-2:]), time.monotonic() - started


def apply(repo: Path, mutation: Mutation) -> dict[Path, str] | str:
    """Make ``mutation``'s edits in ``repo``; the original texts, or why it could not."""
    originals: dict[Path, str] = {}
    for file, old, new in mutation.edits:
        path = repo / file
        if not path.is_file():
            restore(originals)
            return f"{file} does not exist"
        originals.setdefault(path, path.read_text())
        current = path.read_text()
        count = current.count(old)
        if count != 1:
            restore(originals)
            return f"snippet found {count} times in {file}: {old.strip()[:60]!r}"
        path.write_text(current.replace(old, new))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


def check_snippets(repo: Path, mutations: Sequence[Mutation]) -> int:
    """Apply and undo each mutation in the scratch copy ``repo``: are all snippets found?"""
    moved = []
    for mutation in mutations:
        applied = apply(repo, mutation)
        if isinstance(applied, str):
            moved.append(mutation.name)
            print(f"{mutation.name}: {applied}")
        else:
            restore(applied)
    print(f"{len(mutations) - len(moved)} of {len(mutations)} mutations apply")
    return 1 if moved else 0


def outcome(code: int) -> str:
    """What a pytest exit code says about a mutation."""
    if code == 1:
        return "killed"
    if code == -1:
        return "killed (timeout)"
    if code == 0:
        return "SURVIVED"
    return f"error (pytest exit {code})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="mutation names to run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbroken run")
    parser.add_argument(
        "--check", action="store_true", help="only check that every snippet is found (no tests)"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}: {mutation.guarantee}")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="mutations-") as folder:
        repo = scratch_copy(Path(folder))
        if args.check:
            return check_snippets(repo, chosen)
        print(f"scratch copy {repo}; imports {check_imports_from(repo)}", flush=True)
        if not args.no_baseline:
            tests = sorted({test for mutation in chosen for test in mutation.tests})
            code, tail, seconds = run_tests(repo, tests)
            print(f"baseline (unbroken) {len(tests)} test paths: exit {code}, {seconds:.0f} s")
            if code != 0:
                print(f"the tests fail without any mutation: {tail}")
                return 1
        rows = []
        for mutation in chosen:
            applied = apply(repo, mutation)
            if isinstance(applied, str):
                rows.append((mutation, "error (code moved)", applied, 0.0))
            else:
                try:
                    code, tail, seconds = run_tests(repo, mutation.tests)
                finally:
                    restore(applied)
                rows.append((mutation, outcome(code), tail, seconds))
            name, result, detail, seconds = rows[-1][0].name, rows[-1][1], rows[-1][2], rows[-1][3]
            print(f"{result:18s} {name} ({seconds:.0f} s): {detail}", flush=True)
    print("\n| mutation | guarantee | result | seconds |\n|---|---|---|---:|")
    for mutation, result, _, seconds in rows:
        print(f"| {mutation.name} | {mutation.guarantee} | {result} | {seconds:.0f} |")
    bad = [m.name for m, result, _, _ in rows if not result.startswith("killed")]
    print(
        f"\n{len(rows) - len(bad)} of {len(rows)} killed" + (f"; not killed: {bad}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

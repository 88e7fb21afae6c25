"""What protects a run's ``output_dir``: one run at a time (a lock), no fresh run over another run's checkpoints,
and a resume that says which of its settings the checkpoint overrides.

- **Lock.** The main process holds an exclusive ``fcntl.flock`` on ``output_dir/.posttrain.lock`` (its pid inside)
  for the whole run; a second run into the folder stops with one line naming the holder. The kernel drops the lock
  when the process ends, however it ends, so a killed run never leaves a stale lock (the file stays).
- **Fresh runs.** A run that neither resumes nor overwrites refuses a folder that holds ``checkpoint-N`` folders:
  its checkpoints would mix with the old ones, and a later ``--resume`` could pick an old one.
  ``--overwrite_output_dir``
  (transformers 5 removed the TrainingArguments field of that name) deletes them first.
- **Resumed settings.** The optimizer state in a checkpoint brings its own learning rate, weight decay, betas and
  epsilon (torch's ``Optimizer.load_state_dict`` restores the param groups, ``LambdaLR.load_state_dict`` the base
  learning rates); the LR schedule's shape (type, warmup, max_steps) follows the new run. The manifest records the
  checkpoint's values, and a resume whose config differs prints one warning line listing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from posttrain import UserError
from posttrain.paths import file_in_the_way
from posttrain.trainers.runtime import (
    RESUMED_SETTINGS,
    checkpoint_folders,
    checkpoint_problem,
    latest_checkpoint,
    read_manifest,
)

LOCK_FILE = ".posttrain.lock"


def is_main_process(config) -> bool:
    """Global rank 0, known before the Trainer (and its accelerator) exists."""
    return config.process_index == 0


@contextlib.contextmanager
def output_dir_lock(output_dir, main: bool):
    """Hold ``output_dir``'s lock for the block (main process only; the others pass through)."""
    if not main:
        yield
        return
    folder = Path(output_dir)
    fd = _open_lock_file(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"output_dir {folder} is in use by another posttrain run (pid {holder}, lock "
                f"{folder / LOCK_FILE}); wait for it to end, or choose another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock_file(folder: Path) -> int:
    """Create ``folder`` and open its lock file: the first write of a run, so an output_dir that cannot be written
    (a file, under a file, read-only, no permission) is reported here, before any model loads."""
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise UserError(f"output_dir {folder}: {blocking} is a file, not a folder; choose another --output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(
            f"output_dir {folder} cannot be written ({err.strerror or err}); choose a folder you can "
            "write to with --output_dir"
        ) from None


def resume_checkpoint(output_dir) -> Path | None:
    """``--resume``: the newest complete checkpoint, each newer incomplete one reported; None for a folder without
    checkpoints. Checkpoints but none complete is an error: starting over would write among them."""
    folders = checkpoint_folders(output_dir)
    chosen = latest_checkpoint(output_dir)
    for folder in folders[folders.index(chosen) + 1 if chosen else 0 :]:
        print(f"posttrain: skipping {folder.name}: {checkpoint_problem(folder)}")
    if folders and chosen is None:
        raise UserError(
            f"--resume: no complete checkpoint in {output_dir} (newest: {checkpoint_problem(folders[-1])}); "
            "resume from another with --resume_from_checkpoint, or start over with --overwrite_output_dir"
        )
    return chosen


def prepare_fresh_output_dir(output_dir, overwrite: bool, main: bool) -> None:
    """A run from scratch: refuse a folder with checkpoints, or (``overwrite``) delete them on the main process."""
    folders = checkpoint_folders(output_dir)
    if folders and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds checkpoints ({', '.join(f.name for f in folders)}); "
            "continue that run with --resume, choose another --output_dir, or pass --overwrite_output_dir "
            "to delete them and start over"
        )
    if folders and main:
        for folder in folders:
            shutil.rmtree(folder)
        print(f"posttrain: --overwrite_output_dir: deleted {len(folders)} checkpoint(s) in {output_dir}")


def settings_from_checkpoint(checkpoint, config) -> str | None:
    """One warning line naming each setting that ``checkpoint``'s optimizer state overrides in ``config``, or None."""
    saved = read_manifest(checkpoint).get("settings", {})
    differ = [
        f"{k}={saved[k]} (this run: {getattr(config, k, None)})"
        for k in RESUMED_SETTINGS
        if k in saved and saved[k] != getattr(config, k, None)
    ]
    if not differ:
        return None
    return (
        f"posttrain: warning: resuming from {checkpoint}: its optimizer state keeps {', '.join(differ)}; the LR "
        "schedule's shape (lr_scheduler_type, warmup, max_steps) follows this run; to train with the new values, "
        f"start a new run from its weights (--model_name_or_path {checkpoint})"
    )

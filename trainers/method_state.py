"""Method state: what a method learns or adapts beside the model's weights and optimizer (SparsePO's mask networks,
constrained RLHF's Lagrange multipliers, WAGLE's mask, ALF-LB's expert biases), saved in every checkpoint and
restored on resume under every backend, identical on all ranks.

A trainer, or a ``TrainerCallback`` registered with it, declares its state with two methods:

    method_state(self) -> dict | None      called on every rank at each checkpoint (so it may gather a ZeRO-3
                                           parameter: ``gathered``); None: nothing to save in this configuration
    load_method_state(self, state) -> None called on every rank on resume, with rank 0's copy of what
                                           ``method_state`` returned (never None)

``MethodStateMixin`` (every trainer that ``runtime.guarded`` builds has it) does the rest:

- **Save.** ``_save_checkpoint`` writes ``method_state.pt`` (``{owner: state}``, owner ``"trainer"`` or the
  callback's class name) into ``checkpoint-N`` *before* the Trainer writes the weights, optimizer and, last,
  ``trainer_state.json``: every folder that ``runtime.latest_checkpoint`` takes as complete holds it. The saving
  process writes a temporary file and renames it, so the file is whole or absent. The final ``save_model`` (not
  the Trainer's internal one inside a checkpoint) writes it beside the final model too.
- **Restore.** ``train(resume_from_checkpoint=...)`` has rank 0 read the file and broadcast it, then every owner
  loads it, all before the Trainer's own ``train``. That is before any backend prepares the model, and so it does
  not depend on whether the Trainer then calls ``_load_from_checkpoint`` (plain, DDP, FSDP) or only DeepSpeed's
  ``load_checkpoint``: transformers 5.24 skips ``_load_from_checkpoint`` under DeepSpeed (trainer.py L1559-1564,
  L1809-1815), which silently lost every state restored there. State that is also part of the model (mask
  networks, bias buffers) is loaded again, with the same values, by the backend's own weight restore.
- A checkpoint without the file, or without one owner's entry, is refused with one error naming the file and the
  owner (it was written by another method or configuration).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from posttrain import UserError
from posttrain.atomic import write_atomic

STATE_FILE = "method_state.pt"
TRAINER = "trainer"  # the owner name of the trainer's own state


class MissingMethodStateError(UserError, FileNotFoundError):
    """A resume from a checkpoint that lacks the state this run needs (the CLI prints it as one line)."""


def method_state_owners(trainer: object) -> dict:
    """``{owner name: object}``: the trainer if it declares ``method_state``, and each callback that does."""
    owners = {TRAINER: trainer} if callable(getattr(trainer, "method_state", None)) else {}
    for cb in trainer.callback_handler.callbacks:
        if callable(getattr(cb, "method_state", None)) and getattr(cb, "has_method_state", True):
            owners[type(cb).__name__] = cb
    return owners


def save_method_state(state: dict, folder: str | os.PathLike) -> Path:
    """Write ``state`` to ``folder/method_state.pt`` atomically (temporary file in the folder, then rename)."""
    return write_atomic(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def read_method_state(folder: str | os.PathLike, owners: dict) -> dict:
    """The saved state of each of ``owners`` (names) in checkpoint ``folder``; one error if any is missing."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise MissingMethodStateError(
            f"{path} is missing: checkpoint {folder} was not written by a run of this "
            f"method (it needs the state of {', '.join(owners)}); resume from a checkpoint "
            "of the same recipe, or start a new run"
        )
    state = torch.load(path, weights_only=True)
    missing = [o for o in owners if o not in state]
    if missing:
        raise MissingMethodStateError(
            f"{path} has no state of {', '.join(missing)} (it holds "
            f"{', '.join(state) or 'none'}): written by another method or configuration; "
            "resume from a checkpoint of the same recipe, or start a new run"
        )
    return {o: state[o] for o in owners}


def _broadcast_from_rank0(accelerator, make):
    """``make()`` on rank 0, its result (or the exception it raised) on every rank."""
    if accelerator.num_processes == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    holder = [None]
    if accelerator.is_main_process:
        try:
            holder[0] = (True, make())
        except Exception as err:  # the other ranks must not wait for a broadcast that never comes
            holder[0] = (False, err)
    ok, value = broadcast_object_list(holder, from_process=0)[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> AbstractContextManager:
    """Whole parameters inside the block under DeepSpeed ZeRO-3 (a collective: every rank enters it; with
    ``modifier_rank`` that rank's in-place changes are partitioned back), a no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


class MethodStateMixin:
    """Saves the method state of the trainer and its callbacks in every checkpoint and restores it on resume
    (module docstring). Placed before a transformers/TRL trainer in the MRO."""

    def _save_checkpoint(self, model, trial):
        # transformers 5.24 trainer.py L3363-3417: the folder is checkpoint-{global_step} of _get_output_dir(trial);
        # the parent then writes weights, optimizer, RNG and, last, trainer_state.json into it
        self.write_method_state(Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}")
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # the final model (checkpoints get theirs in _save_checkpoint, before the weights)
            self.write_method_state(output_dir or self.args.output_dir)

    def write_method_state(self, folder) -> None:
        """Collect the method state on every rank (it may gather); the saving process writes it into ``folder``."""
        owners = method_state_owners(self)
        if owners:
            states = {name: owner.method_state() for name, owner in owners.items()}
            if self.args.should_save:
                save_method_state(states, folder)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:  # as Trainer.train resolves it
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.restore_method_state(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def restore_method_state(self, checkpoint) -> None:
        """Load checkpoint's method state into the trainer and its callbacks: rank 0 reads it, every rank loads the
        same bits."""
        owners = method_state_owners(self)
        if not owners:
            return
        states = _broadcast_from_rank0(self.accelerator, lambda: read_method_state(checkpoint, owners))
        for name, owner in owners.items():
            if states[name] is not None:
                owner.load_method_state(states[name])

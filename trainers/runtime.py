"""What every trainer gets at run time: a non-finite guard, the choice of checkpoint to resume from, and two small
distributed helpers (``sum_over_ranks``, and ``close_process_group`` for the end of a launched script).

**Non-finite guard.** ``guarded(TrainerClass)`` returns a subclass that stops the run with
``NonFiniteError`` (naming the step) as soon as a micro-batch loss or the gradient norm is NaN/inf, before
the trainer can log or save anything from that step, so the newest checkpoint on disk is the last good
one. The check rides on ``Trainer._get_grad_norm`` (transformers 5.24, pinned): it runs once per
optimizer step, before ``optimizer.step()`` (under DeepSpeed the engine has already stepped inside
backward, but nothing is saved afterwards). The flags are summed over data-parallel ranks, so every
rank stops at the same step instead of leaving the others waiting in a collective.

**Resume of MoE models.** transformers 5.24's ``save_pretrained`` writes fused expert tensors
(``experts.gate_up_proj``, ``experts.down_proj`` of DeepSeek-V3, GLM-4-MoE, Qwen-MoE, Mixtral, ...) back in the
hub's per-expert layout (``experts.0.gate_proj.weight``, ...), but ``Trainer._load_from_checkpoint`` loads the
checkpoint with a plain ``load_state_dict(strict=False)``: the experts' keys do not match and the resumed run
silently keeps the experts' *initial* weights (only a "missing keys" warning). ``ConvertedCheckpointLoad`` finishes
that load: keys still missing after it are taken from ``from_pretrained`` of the checkpoint, which applies the
layout conversion. DeepSpeed resumes from its own checkpoint (runtime layout) and is untouched.

**Checkpoints.** A ``checkpoint-N`` is *complete* when every file the resume reads is present and readable.
After the Trainer has written everything (every rank: weights, optimizer or DeepSpeed's ``global_stepN/`` shards,
scheduler, RNG states, ``trainer_state.json``) and all ranks have met at a barrier, the saving process writes
``checkpoint_manifest.json`` last (write, then rename), listing each file with its size.
``checkpoint_problem`` checks a folder against it: manifest readable, each listed file there with its size,
safetensors headers and torch zip directories readable, and the files a resume needs all listed (trainer state of
step N, weights, optimizer, scheduler, one RNG state per rank, DeepSpeed's ``latest`` and per-rank shards). A
``save_only_model`` checkpoint is intact but not resumable (no optimizer, scheduler or RNG state), and is reported
so. ``latest_checkpoint(output_dir)`` is the newest complete one, unlike ``transformers.get_last_checkpoint``. The
Trainer's ``save_total_limit`` rotation runs after the manifest, so the previous complete checkpoint is never
deleted before the new one is complete. No checkpoint (nor final model) with non-finite weights is written: the
check is one ``isfinite`` pass over each rank's parameters (its ZeRO-3 partition), a flag summed over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

import json
import os
import re
import zipfile
from pathlib import Path

import torch

from posttrain import TrainingError
from posttrain.atomic import write_json_atomic

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
MANIFEST = "checkpoint_manifest.json"
# what a resume keeps from the checkpoint's optimizer state whatever this run asks (torch's Optimizer.load_state_dict
# restores the param groups' hyperparameters, LambdaLR.load_state_dict the base learning rates); recorded in the
# manifest so a resume can say which of its settings do not apply
RESUMED_SETTINGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args")


class NonFiniteError(TrainingError):
    pass


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders in ``output_dir``, complete or not, oldest step first."""
    folder = Path(output_dir)
    found = [c for c in folder.iterdir() if _CHECKPOINT.match(c.name) and c.is_dir()] if folder.is_dir() else []
    return sorted(found, key=lambda c: int(_CHECKPOINT.match(c.name).group(1)))


def write_checkpoint_manifest(folder: str | os.PathLike, args: TrainingArguments, world_size: int) -> Path:
    """List every file in ``folder`` (recursively) with its size into ``folder/checkpoint_manifest.json``, written
    last and atomically: the mark that the save finished on every rank."""
    folder = Path(folder)
    files = {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")
    }
    manifest = {
        "step": int(_CHECKPOINT.match(folder.name).group(1)),
        "world_size": world_size,
        "save_only_model": bool(args.save_only_model),
        "settings": {k: getattr(args, k, None) for k in RESUMED_SETTINGS},
        "files": files,
    }
    return write_json_atomic(folder / MANIFEST, manifest, indent=1, default=str)


def read_manifest(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read, from its header alone (cheap): a safetensors header whose tensors do not end at
    the end of the file, or a torch file (a zip since torch 1.6) without a readable central directory."""
    try:
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:  # never read a length that garbage bytes claim
                    return f"{size} bytes, too short for its safetensors header"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != path.stat().st_size:
                return f"{path.stat().st_size} bytes, its header describes {8 + n + end}"
        elif path.suffix in (".pt", ".pth", ".bin"):
            zipfile.ZipFile(path).close()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def _missing_for_resume(folder: Path, manifest: dict) -> list[str]:
    """The files a resume of ``folder`` reads that its manifest does not list (the Trainer did not write them)."""
    files, world = set(manifest["files"]), manifest.get("world_size", 1)
    deepspeed = {f.split("/")[0] for f in files if f.startswith("global_step")}
    needed = [] if files & set(_WEIGHTS) or deepspeed else ["model weights (" + " or ".join(_WEIGHTS) + ")"]
    if manifest.get("save_only_model"):
        return needed
    needed += [
        n for n in (["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]) if n not in files
    ]
    if deepspeed:  # DeepSpeed's load_checkpoint reads the tag named in `latest`, one optimizer shard per rank
        tag = (folder / "latest").read_text().strip() if "latest" in files else None
        if tag is None or tag not in deepspeed:
            needed.append("latest (naming a global_stepN folder)")
        else:
            shards = [f for f in files if f.startswith(f"{tag}/") and f.endswith("optim_states.pt")]
            models = [f for f in files if f.startswith(f"{tag}/") and f.endswith("model_states.pt")]
            if len(shards) < world or not models:
                needed.append(f"{tag}/*optim_states.pt for each of {world} ranks and *model_states.pt")
    else:  # under DeepSpeed scheduler.pt exists only for a Trainer-made scheduler (a DeepSpeed one is in the
        # engine's checkpoint), and the manifest's sizes cover it when written (transformers 5.24 trainer.py L3575-3584)
        # optimizer.pt; FSDP writes optimizer.bin or an optimizer_0/ folder
        needed += [] if any(f.split("/")[0].startswith("optimizer") for f in files) else ["optimizer.pt"]
        needed += [] if "scheduler.pt" in files else ["scheduler.pt"]
    return needed


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """None if ``folder`` is a complete, resumable checkpoint-N; else one line naming the missing or damaged file."""
    folder = Path(folder)
    match = _CHECKPOINT.match(folder.name)
    if not match or not folder.is_dir():
        return f"{folder} is not a checkpoint-N folder"
    try:
        manifest = read_manifest(folder)
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"{folder / MANIFEST} is missing or unreadable: the save was cut short (or predates posttrain's "
            "checkpoint manifests)"
        )
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is damaged: {path.stat().st_size} bytes, {size} when saved"
        damage = file_problem(path)
        if damage:
            return f"{path} is damaged: {damage}"
    needed = _missing_for_resume(folder, manifest)
    if needed:
        return f"{folder} lacks {', '.join(needed)}"
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError):
        step = None
    if step != int(match.group(1)) or "trainer_state.json" not in listed:
        return f"{folder / 'trainer_state.json'} is missing or not of step {match.group(1)}"
    if manifest.get("save_only_model"):
        return (
            f"{folder} was saved with save_only_model (weights only: no optimizer, scheduler or RNG state), so "
            f"it cannot be resumed exactly; start a new run from its weights (--model_name_or_path {folder})"
        )
    return None


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return checkpoint_problem(folder) is None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (incomplete newer ones are skipped), or None."""
    return next((c for c in reversed(checkpoint_folders(output_dir)) if is_complete_checkpoint(c)), None)


class NonFiniteGuard:
    """Mixin placed before a transformers/TRL trainer in the MRO (see the module docstring)."""

    _loss_finite: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        step = self.state.global_step
        run_dir = self._get_output_dir(trial=trial)
        self._stop_if_weights_non_finite(f"after step {step}; checkpoint-{step} was not written", run_dir)
        # transformers 5.24 trainer.py L3422-3430 rotates (deletes old checkpoints) at the end of _save_checkpoint,
        # before the manifest below makes the new one complete: rotate after it instead
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG state, DeepSpeed shards) are on disk
        if self.args.should_save:
            write_checkpoint_manifest(Path(run_dir) / f"checkpoint-{step}", self.args, self.accelerator.num_processes)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def save_model(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # the final model (checkpoints are checked in _save_checkpoint)
            self._stop_if_weights_non_finite(
                f"at the end of training (step {self.state.global_step}); the final model was not saved",
                self.args.output_dir,
            )
        super().save_model(output_dir, _internal_call)

    def _stop_if_weights_non_finite(self, when: str, run_dir) -> None:
        """One isfinite pass over this rank's parameters (under ZeRO-3 its partition, ``ds_tensor``: the parameter
        itself is empty there); the flag is summed over ranks, so every rank stops together. A collective: every
        rank calls it."""
        device = self.accelerator.device
        flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all().to(device) for p in self.model.parameters()]
        bad = (~torch.stack(flags)).sum().float().reshape(1) if flags else torch.zeros(1, device=device)
        if self.accelerator.reduce(bad, reduction="sum").item():
            last = latest_checkpoint(run_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"non-finite weights {when}; {where} (continue with --resume, e.g. with a lower "
                "learning_rate or max_grad_norm)"
            )

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss_ok = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, dtype=torch.float32)
        device = self.accelerator.device
        bad = torch.stack([(~loss_ok).float().to(device), (~torch.isfinite(norm)).float().to(device)])
        bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.any():
            step = self.state.global_step + 1
            what = " and ".join(name for name, flag in zip(("loss", "gradient norm"), bad.tolist()) if flag)
            last = latest_checkpoint(self.args.output_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"non-finite {what} at step {step} (gradient norm {norm.item():g}); "
                f"stopped before saving anything from this step; {where} (continue with --resume, "
                "e.g. with a lower learning_rate or max_grad_norm)"
            )
        return grad_norm


class ConvertedCheckpointLoad:
    """Mixin: completes ``Trainer._load_from_checkpoint`` for weights saved in a converted layout (module doc)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        outer = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if hasattr(outer, "peft_config") or not (single.is_file() or index.is_file()):
            return  # adapters and .bin checkpoints: as transformers loads them
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                saved = set(f.keys())
        else:
            saved = set(json.loads(index.read_text())["weight_map"])
        from posttrain.trainers.trl_seam import inner_model  # TRL: imported when a checkpoint loads

        target = inner_model(outer)
        own = target.state_dict()
        tied = (
            {k for k in own if k == "lm_head.weight"} if getattr(target.config, "tie_word_embeddings", False) else set()
        )
        missing = sorted(set(own) - saved - tied)
        if not missing or not saved - set(own):
            # nothing missing, or nothing saved under another name: the load was complete (keys that only the
            # model holds, e.g. a method's own modules saved beside it, are restored by that method)
            return
        converted = type(target).from_pretrained(str(folder), dtype=own[missing[0]].dtype).state_dict()
        found = {k: converted[k] for k in missing if k in converted}
        if found:
            target.load_state_dict(found, strict=False)


def sum_over_ranks(t: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """``t`` summed over the ranks of ``group`` (default: all) when torch.distributed is running, else ``t`` itself.
    The sum is a new tensor on ``t``'s device; under NCCL it goes through the current GPU (NCCL reduces device
    tensors only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
    out = t.to(device, copy=True)
    dist.all_reduce(out, group=group)
    return out.to(t.device)


def close_process_group() -> None:
    """The end of a successful launched script (and of ``posttrain train``/``eval``): when a process group is
    running, leave it together and end the process here, with exit code 0, without the interpreter's
    finalization; otherwise do nothing (a single-process run exits normally).

    Why the process ends here (a rank SIGABRTed with 'terminate called without an active exception'
    after a good run). ``destroy_process_group`` only drops torch.distributed's own references: the DDP
    reducer, DeepSpeed and accelerate still hold the group, so its gloo worker threads (``pt_gloo_runloop``)
    live on to the end of the process. A worker drops its references to a finished collective *after* waking
    the rank that waited on it (torch 2.13 ``ProcessGroupGloo::runLoop``, torch/csrc/distributed/c10d/
    ProcessGroupGloo.cpp: ``AsyncWork::execute`` completes the future, then ``workInProgress_[i].reset()``).
    If that was the last reference to a tensor whose Python object torch keeps alive for C++, the worker
    must take the GIL to release it. A worker starved on a busy machine can get there after the main thread
    has begun finalizing; CPython 3.11 then ends it with ``pthread_exit`` from inside ``take_gil``
    (Python/ceval_gil.h), and that forced unwind through torch's noexcept destructors is
    ``std::terminate``. Forced with scripts/slowgil.c (a gloo worker held 300 ms before it takes the GIL), a
    plain all_reduce script dies so in 4 of 12 runs; the aborting thread's core (top first): std::terminate
    < __gxx_personality_v0 < _Unwind_ForcedUnwind < pthread_exit < PyThread_exit_thread < take_gil <
    pybind11::gil_scoped_acquire < ConcretePyInterpreterVTable::decref < TensorImpl::decref_pyobject <
    ~AsyncAllreduceWork < ProcessGroupGloo::runLoop. No Python-side teardown can wait for those threads (only
    ``~ProcessGroupGloo`` joins them, once the last holder lets go), so the finalization is skipped instead:
    non-daemon threads are joined and atexit handlers run as at a normal exit, the streams are flushed, then
    ``os._exit(0)`` (the same script ending with this function: 0 aborts in 12 runs).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _exit_without_finalizing(0)


def exit_launched_process(code: int) -> None:
    """For a launched process that stops on an error (exit ``code``): end it without the interpreter's
    finalization, for the reason in close_process_group (the gloo workers outlive any Python teardown, whatever
    the exit code). No barrier: the other ranks may not be where this one is. Returns when no process group runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _exit_without_finalizing(code)


def _exit_without_finalizing(code: int) -> None:
    """What ``sys.exit(code)`` does before the interpreter's finalization (threading._shutdown, then the atexit
    handlers: logging, tempfile and datasets cleanup, ...), then ``os._exit(code)``: see close_process_group."""
    import atexit
    import sys
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # closed or replaced by a caller
            pass
    os._exit(code)


def guarded(trainer_cls: type) -> type:
    """``trainer_cls`` with the non-finite guard, the converted-checkpoint load and (for stock trainers, whose
    callbacks may carry method state, e.g. ALF-LB's expert biases) ``MethodStateMixin``; same name, so logs and
    model cards read as before."""
    from posttrain.trainers.method_state import MethodStateMixin

    state = () if issubclass(trainer_cls, MethodStateMixin) else (MethodStateMixin,)
    return type(
        trainer_cls.__name__,
        (NonFiniteGuard, ConvertedCheckpointLoad, *state, trainer_cls),
        {"__module__": trainer_cls.__module__},
    )

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

**Checkpoints.** ``latest_checkpoint(output_dir)`` is the newest *complete* ``checkpoint-N``: the
Trainer writes ``trainer_state.json`` last, so a folder whose state file is missing, unreadable or from
another step (a run killed mid-save) is never picked, unlike ``transformers.get_last_checkpoint``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from posttrain import TrainingError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


class NonFiniteError(TrainingError):
    pass


def is_complete_checkpoint(folder: Path) -> bool:
    match = _CHECKPOINT.match(folder.name)
    if not match or not folder.is_dir():
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any((folder / name).exists() for name in _WEIGHTS) or any(folder.glob("global_step*"))
    return state.get("global_step") == int(match.group(1)) and has_weights


def latest_checkpoint(output_dir) -> Path | None:
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    complete = [c for c in folder.iterdir() if is_complete_checkpoint(c)]
    return max(complete, key=lambda c: int(_CHECKPOINT.match(c.name).group(1)), default=None)


class NonFiniteGuard:
    """Mixin placed before a transformers/TRL trainer in the MRO (see the module docstring)."""

    _loss_finite: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

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
        target = inner_model(outer)
        own = target.state_dict()
        tied = {k for k in own if k == "lm_head.weight"} if getattr(target.config, "tie_word_embeddings", False) else set()
        missing = sorted(set(own) - saved - tied)
        if not missing or not saved - set(own):
            # nothing missing, or nothing saved under another name: the load was complete (keys that only the
            # model holds, e.g. a method's own modules saved beside it, are restored by that method)
            return
        converted = type(target).from_pretrained(str(folder), dtype=own[missing[0]].dtype).state_dict()
        found = {k: converted[k] for k in missing if k in converted}
        if found:
            target.load_state_dict(found, strict=False)


def sum_over_ranks(t, group=None):
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

    Why the process ends here (issue 14: a rank SIGABRTed with 'terminate called without an active exception'
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
        _exit_without_finalizing()


def _exit_without_finalizing() -> None:
    """What ``sys.exit(0)`` does before the interpreter's finalization (threading._shutdown, then the atexit
    handlers: logging, tempfile and datasets cleanup, ...), then ``os._exit(0)``: see close_process_group."""
    import atexit
    import os
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
    os._exit(0)


def inner_model(model):
    """The plain transformers model inside DDP/DeepSpeed wrappers and a PEFT model (the base model)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def guarded(trainer_cls: type) -> type:
    """``trainer_cls`` with the non-finite guard; same name, so logs and model cards read as before."""
    return type(trainer_cls.__name__, (NonFiniteGuard, ConvertedCheckpointLoad, trainer_cls),
                {"__module__": trainer_cls.__module__})

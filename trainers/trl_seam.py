"""The one seam between posttrain and the private parts of TRL 1.16.0 and transformers 5.24.0 (both pinned exactly).

Upgrading either library means reviewing this module: the helpers below are the only place posttrain imports TRL's
private utilities, and the table lists every private method a posttrain trainer overrides, with the lines of the
pinned release it follows (paths inside site-packages). When a line range moves or the method's contract changes,
the override next to it must be re-read.

Overrides of private methods (posttrain's, then the pinned lines they follow; ``trl/`` and ``transformers/`` are the
packages in site-packages, ``grpo``/``rloo``/``dpo`` are ``trl/trainer/<name>_trainer.py``, ``trainer`` is
``transformers/trainer.py``):

    SparsePOTrainer._compute_loss                        dpo L1285-1613
    SparsePOTrainer.__init__: patches policy.forward     dpo _compute_loss's model call (as TRL's fused LM head)
    THRGRPOTrainer._calculate_rewards                    grpo L1579-1683
    THRGRPOTrainer._generate_and_score_completions       grpo L2324-2938
    THRGRPOTrainer._compute_loss (GSPO-token)            grpo L3020-3293
    THRGRPOTrainer._get_per_token_logps_and_entropies    grpo L1419-1509
    _ConstrainedMixin._calculate_rewards                 rloo L1148-1248, grpo L1579-1683
    _ConstrainedMixin._generate_and_score_completions    rloo L1458-1788, grpo L2324-2938
    _ConstrainedMixin._prepare_inputs                    rloo L1091-1121, grpo L1522-1552
    _ConstrainedMixin.training_step                      rloo L1079-1090, grpo L1510-1521
    WAGLETrainer._prepare_for_training                   trainer L1715-1826
    WAGLETrainer._remove_unused_columns                  trainer L1195-1229
    WAGLETrainer.training_step / compute_loss / log      trainer L2051-2129 / L2130-2218 / L4189-4212
    _MaskAfterClipping (clip -> mask -> step)            trainer _run_epoch L1939-1943
    NonFiniteGuard._get_grad_norm (runtime.py)           trainer L2789-2804
    NonFiniteGuard._save_checkpoint / save_model         trainer L3363-3431 / L4085-4138
    ConvertedCheckpointLoad._load_from_checkpoint        trainer L3610-3742
    MethodStateMixin._save_checkpoint / save_model / train   trainer L3363-3431 / L4085-4138 / L1450-1582
    _softmax_router_forward (moe_balance.py)             transformers/models/qwen3_moe/modeling_qwen3_moe.py L259-268
                                                         (Qwen2-MoE L320-329, Mixtral L104-111)

Public overrides that read TRL's inputs layout: ``compute_loss`` of the SFT trainers that self-distillation
(``classic/self_distill.py``) and KL-DRO reweighting (``classic/done.py``) build, following
trl/trainer/sft_trainer.py L1560-1678.

TRL private utilities used (re-exported here): ``disable_gradient_checkpointing`` (trl/models/utils.py L397-416),
``maybe_gather_lm_head_ctx`` (trl/trainer/utils.py L200-235), ``use_adapter`` (trl/trainer/utils.py L1415-1453),
``prepare_deepspeed`` (trl/models/utils.py L246). The method state that rides in every checkpoint has its own module
(``trainers/method_state.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import Trainer
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed
from trl.trainer.utils import use_adapter

__all__ = [
    "capture_last_hidden_state",
    "disable_gradient_checkpointing",
    "gather_padded",
    "inner_model",
    "maybe_gather_lm_head_ctx",
    "prepare_deepspeed",
    "reference_model",
    "use_adapter",
]


def maybe_gather_lm_head_ctx(*params: torch.Tensor) -> contextlib.AbstractContextManager:
    """TRL's ``maybe_gather_lm_head_ctx`` (gathers ZeRO-3-partitioned head tensors for the block), looked up when
    called, so a test can stand in a simulated partitioning for it."""
    from trl.trainer import utils

    return utils.maybe_gather_lm_head_ctx(*params)


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside DDP/DeepSpeed wrappers and a PEFT model (the base model)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def capture_last_hidden_state(model: torch.nn.Module) -> Iterator[dict]:
    """While open, every forward of ``model``'s backbone (``inner_model(model).base_model``) stores its
    ``last_hidden_state`` (B, T, d) -- the input of the LM head -- under ``"h"`` of the yielded dict. SparsePO's
    reference pass and THR's old-policy pass read it instead of asking the model for all hidden states."""
    captured: dict = {}
    handle = inner_model(model).base_model.register_forward_hook(
        lambda module, args, out: captured.update(h=out.last_hidden_state)
    )
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def reference_model(trainer: Trainer) -> Iterator[torch.nn.Module]:
    """The model to call for reference log-probs / hidden states, as TRL 1.16's trainers choose it: the separate
    ``trainer.ref_model`` when there is one, else (PEFT) the policy with its adapter disabled, or with the adapter
    named ``"ref"`` (the initial copy TRL keeps for a PEFT model trained from an adapter) active."""
    if trainer.ref_model is not None:
        yield trainer.ref_model
        return
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
        yield trainer.model


def gather_padded(accelerator: Accelerator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather (B, T, ...) tensors of every rank along dim 0, each right-padded along dim 1 with zeros to the longest
    T of any rank (ranks' completions differ in length). Every rank must call it (a collective)."""
    local_t = tensors[0].size(1)
    width = int(accelerator.gather(torch.tensor([local_t], device=tensors[0].device)).max())
    return tuple(accelerator.gather(F.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.size(1)))) for x in tensors)

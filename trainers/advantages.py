"""Group-relative advantages and the working dtype, shared by the GRPO- and RLOO-based methods.

TRL 1.16 computes these inline in ``GRPOTrainer._generate_and_score_completions`` and
``RLOOTrainer._generate_and_score_completions``; THR and constrained RLHF need them as functions (THR to anchor its
token advantages on GRPO's, constrained RLHF to take each reward stream's baseline separately).
"""

from __future__ import annotations

import torch
from torch import Tensor


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the methods' statistics never run in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def group_mean_advantages(rewards: Tensor, num_generations: int, scale: str = "group") -> Tensor:
    """GRPO advantages over dim 0 (TRL 1.16): r - mean of its group, divided by the group's unbiased std + 1e-4
    (``scale="group"``), by the batch std + 1e-4 (``"batch"``) or not at all (``"none"``). (B,) or (B, N)."""
    k = int(num_generations)
    if rewards.shape[0] % k:
        raise ValueError(f"batch of {rewards.shape[0]} is not a multiple of num_generations={k}")
    grouped = rewards.reshape(-1, k, *rewards.shape[1:])
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(rewards.shape)
    if scale == "group":
        std = grouped.std(1, unbiased=True, keepdim=True).expand_as(grouped).reshape(rewards.shape)
        return centred / (std + 1e-4)
    if scale == "batch":
        return centred / (rewards.std(0, unbiased=True) + 1e-4)
    if scale == "none":
        return centred
    raise ValueError(f"scale={scale!r}; valid: group, batch, none")


def grpo_group_advantages(rewards: Tensor) -> Tensor:
    """GRPO advantages of one group (G,): (r - mean) / (unbiased std + 1e-4), as TRL 1.16 with scale_rewards="group",
    in ``work_dtype``."""
    return group_mean_advantages(rewards.to(work_dtype(rewards)), rewards.numel(), "group")


def rloo_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """RLOO advantages: r - mean of the other completions of the same prompt, over dim 0.

    rewards (B,) or (B, N) with the num_generations completions of each prompt consecutive (TRL's layout).
    """
    k = int(num_generations)
    if k < 2:
        raise ValueError(f"RLOO needs num_generations >= 2 (got {k})")
    if rewards.shape[0] % k:
        raise ValueError(f"batch of {rewards.shape[0]} is not a multiple of num_generations={k}")
    grouped = rewards.reshape(-1, k, *rewards.shape[1:])
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(rewards.shape)

"""The method registry: one explicit dict from recipe ``method:`` name to trainer, config and task.

Classes are named as ``"module:attr"`` strings and imported on first use, so ``posttrain list`` and
recipe errors do not pay for importing TRL. The stock TRL trainers are registered next to the
research methods so that every method's baseline is one word away in the same recipe.

``task`` names the data the method needs (see ``posttrain.data.TASKS``); ``aux`` marks a non-LLM
auxiliary trainer, driven by its own config alone (no model or data arguments).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def import_object(path: str):
    """Import ``"package.module:attr"``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Method:
    trainer: str
    config: str
    task: str
    description: str
    model: str = "causal_lm"  # "reward" for sequence classifiers with one output
    parent: str | None = None  # the registered TRL method this one extends (bench/ compares the two); None: itself

    @property
    def trainer_cls(self):
        return import_object(self.trainer)

    @property
    def config_cls(self):
        return import_object(self.config)


METHODS: dict[str, Method] = {
    # Stock TRL baselines.
    "sft": Method("trl:SFTTrainer", "trl:SFTConfig", "sft", "supervised fine-tuning (TRL SFTTrainer)"),
    "dpo": Method("trl:DPOTrainer", "trl:DPOConfig", "preference", "direct preference optimisation (TRL DPOTrainer)"),
    "kto": Method("trl:KTOTrainer", "trl:KTOConfig", "unpaired", "Kahneman-Tversky optimisation (TRL KTOTrainer)"),
    "reward": Method(
        "trl:RewardTrainer",
        "trl:RewardConfig",
        "preference",
        "Bradley-Terry reward model (TRL RewardTrainer)",
        "reward",
    ),
    "grpo": Method(
        "trl:GRPOTrainer", "trl:GRPOConfig", "prompt", "group relative policy optimisation (TRL GRPOTrainer)"
    ),
    "rloo": Method("trl:RLOOTrainer", "trl:RLOOConfig", "prompt", "REINFORCE leave-one-out (TRL RLOOTrainer)"),
    # Research methods.
    "sparsepo": Method(
        "posttrain.trainers.sparsepo:SparsePOTrainer",
        "posttrain.trainers.sparsepo:SparsePOConfig",
        "preference",
        "SparsePO: TDPO-1 with learned or activation token masks (arXiv 2410.05102)",
        parent="dpo",
    ),
    "thr_grpo": Method(
        "posttrain.trainers.thr_grpo:THRGRPOTrainer",
        "posttrain.trainers.thr_grpo:THRGRPOConfig",
        "prompt",
        "THR-GRPO: token-hidden-reward advantages steer GRPO (arXiv 2510.03669; NTHR exact, THR reconstructed)",
        parent="grpo",
    ),
    "constrained_rlhf": Method(
        "posttrain.trainers.constrained_rlhf:ConstrainedRLHFTrainer",
        "posttrain.trainers.constrained_rlhf:ConstrainedRLHFConfig",
        "prompt",
        "constrained RLHF: Lagrange multipliers weigh several reward models, NM threshold search (arXiv 2310.04373)",
        parent="rloo",
    ),
    "constrained_grpo": Method(
        "posttrain.trainers.constrained_rlhf:ConstrainedGRPOTrainer",
        "posttrain.trainers.constrained_rlhf:ConstrainedGRPOConfig",
        "prompt",
        "constrained RLHF on GRPO's group-mean baseline (arXiv 2310.04373)",
        parent="grpo",
    ),
    "wagle": Method(
        "posttrain.trainers.wagle:WAGLETrainer",
        "posttrain.trainers.wagle:WAGLEConfig",
        "unlearn",
        "WAGLE: GradDiff/NPO/PO unlearning on a weight-attribution mask (arXiv 2410.17509)",
    ),
    # Auxiliary (non-LLM) trainers.
    "fedau": Method(
        "posttrain.trainers.classic.fedau:FedAUTrainer",
        "posttrain.trainers.classic.fedau:FedAUConfig",
        "aux",
        "FedAU federated averaging under unknown participation (arXiv 2306.03401)",
    ),
    "li2_grokking": Method(
        "posttrain.trainers.classic.li2_grokking:Li2GrokkingTrainer",
        "posttrain.trainers.classic.li2_grokking:Li2GrokkingConfig",
        "aux",
        "Li2 grokking: group arithmetic with feature-emergence stats, Adam or Muon (arXiv 2509.21519)",
    ),
    "self_distill": Method(
        "posttrain.trainers.classic.self_distill:KRRSelfDistillTrainer",
        "posttrain.trainers.classic.self_distill:SelfDistillConfig",
        "aux",
        "self-distillation with ground-truth mixing, kernel ridge regression toy (arXiv 2102.13088); "
        "for LLMs: self_distill_alpha on sft",
    ),
    "weight_compander": Method(
        "posttrain.trainers.classic.weight_compander:WeightCompanderTrainer",
        "posttrain.trainers.classic.weight_compander:WeightCompanderConfig",
        "aux",
        "WC-like Weight Compander on a digits MLP (arXiv 2306.16993, reconstructed); for LLMs: weight_compander_* keys",
    ),
    "unfolded_ista": Method(
        "posttrain.trainers.classic.unfolded_ista:UnfoldedISTATrainer",
        "posttrain.trainers.classic.unfolded_ista:UnfoldedISTAConfig",
        "aux",
        "deep-unfolded ISTA / IHT, learned step sizes, supervised vs unsupervised loss (arXiv 2509.01331)",
    ),
    "scad_mcp": Method(
        "posttrain.trainers.classic.scad_mcp:ScadMCPTrainer",
        "posttrain.trainers.classic.scad_mcp:ScadMCPConfig",
        "aux",
        "SCAD / MCP regression by accelerated gradient, optional MI screening (arXiv 2009.10629, 2410.10082)",
    ),
}

# Optimizers selectable in any LLM recipe with ``optim: <name>`` (``optim_args`` carries their options);
# each entry is (optimizer class, parser of the optim_args string into its keyword arguments).
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "lion_k": ("posttrain.trainers.classic.lion_k:LionK", "posttrain.trainers.classic.lion_k:lion_k_kwargs"),
    # a factory (called with the model): hidden matrices on torch.optim.Muon, the rest on AdamW
    "muon": ("posttrain.trainers.muon:MuonFactory", "posttrain.trainers.muon:muon_kwargs"),
}

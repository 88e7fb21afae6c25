"""The method registry: one explicit dict from recipe ``method:`` name to trainer, config and task.

Classes are named as ``"module:attr"`` strings and imported on first use, so ``posttrain list`` and
recipe errors do not pay for importing TRL. The stock TRL trainers are registered next to the
research methods so that every method's baseline is one word away in the same recipe.

``task`` names the data the method needs (see ``posttrain.data.DATA_TASKS``); ``aux`` marks a non-LLM
auxiliary trainer, driven by its own config alone (no model or data arguments).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def import_object(path: str) -> object:
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
    "hidenseek": Method(
        "posttrain.trainers.classic.hidenseek:HideNseekTrainer",
        "posttrain.trainers.classic.hidenseek:HideNseekConfig",
        "aux",
        "HideNseek: federated sign supermask on a SynFlow-pruned random MLP, digits (arXiv 2206.04385, reconstructed)",
    ),
    "modhifi": Method(
        "posttrain.trainers.classic.modhifi:ModHiFiTrainer",
        "posttrain.trainers.classic.modhifi:ModHiFiConfig",
        "aux",
        "ModHiFi model tool: prune / class-unlearn by high-fidelity components, no gradients (arXiv 2511.19566; "
        "scores reconstructed); LLM MLP channels via model_name_or_path",
    ),
    "blindspot": Method(
        "posttrain.trainers.classic.blindspot:BlindspotTrainer",
        "posttrain.trainers.classic.blindspot:BlindspotConfig",
        "aux",
        "Blindspot regression unlearning through a partially trained proxy, and its baselines (arXiv 2210.08196)",
    ),
    "tanglenas": Method(
        "posttrain.trainers.classic.tanglenas:TangleNASTrainer",
        "posttrain.trainers.classic.tanglenas:TangleNASConfig",
        "aux",
        "TangleNAS weight-entangled one-shot NAS on a digits MLP, against a DARTS supernet (arXiv 2312.10440)",
    ),
    "enas": Method(
        "posttrain.trainers.classic.enas:ENASTrainer",
        "posttrain.trainers.classic.enas:ENASConfig",
        "aux",
        "ENAS controller with/without a memory buffer (buffer loss UNVERIFIED) and random search with shared "
        "weights (arXiv 1904.00438)",
    ),
    "bandlimited": Method(
        "posttrain.trainers.classic.bandlimited:BandlimitedTrainer",
        "posttrain.trainers.classic.bandlimited:BandlimitedConfig",
        "aux",
        "shallow nets with bandlimited random weights: random tanh units, ridge readout, width scan (Li et al. 2020)",
    ),
    "gbnn": Method(
        "posttrain.trainers.classic.gbnn:GBNNTrainer",
        "posttrain.trainers.classic.gbnn:GBNNConfig",
        "aux",
        "GBNN: a one-hidden-layer network trained stage by stage with gradient boosting (Emami & Martinez-Munoz 2019)",
    ),
    "done": Method(
        "posttrain.trainers.classic.done:DONETrainer",
        "posttrain.trainers.classic.done:DONEConfig",
        "aux",
        "DONE: KL-DRO instance-reweighted adversarial training, first-order (arXiv 2308.00311); "
        "for LLMs: kl_dro_r on sft",
    ),
    "pareto_da": Method(
        "posttrain.trainers.classic.pareto_da:ParetoDATrainer",
        "posttrain.trainers.classic.pareto_da:ParetoDAConfig",
        "aux",
        "ParetoDA: DANN objectives weighted by a target-guided Pareto direction (NeurIPS 2021) on rotated digits",
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
    # Data stages with their own experiment (a step perturbs or synthesises; the output rows land in output_dir).
    "beo": Method(
        "posttrain.data.beo:BEOTrainer",
        "posttrain.data.beo:BEOConfig",
        "aux",
        "BEO unlearnable examples: centroid shift or PGA on a kernel Bayes-error estimate, digits (arXiv 2511.08191)",
    ),
    "private_gsd": Method(
        "posttrain.data.private_gsd:PrivateGSDTrainer",
        "posttrain.data.private_gsd:PrivateGSDConfig",
        "aux",
        "Private-GSD: zCDP synthetic data by a genetic algorithm on marginal and prefix queries (arXiv 2306.03257)",
    ),
}

# Optimizers selectable in any LLM recipe with ``optim: <name>`` (``optim_args`` carries their options);
# each entry is (optimizer class, parser of the optim_args string into its keyword arguments).
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "lion_k": ("posttrain.trainers.classic.lion_k:LionK", "posttrain.trainers.classic.lion_k:lion_k_kwargs"),
    # a factory (called with the model): hidden matrices on torch.optim.Muon, the rest on AdamW
    "muon": ("posttrain.trainers.muon:MuonFactory", "posttrain.trainers.muon:muon_kwargs"),
}

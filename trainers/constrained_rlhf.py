"""Constrained RLHF: composite reward models, Lagrange multipliers, proxy points and NM-PPO (arXiv 2310.04373).

Paper: Moskovitz, Singh, Strouse, Sandholm, Salakhutdinov, Dragan, McAleer, "Confronting Reward Model
Overoptimization with Constrained RLHF", arXiv 2310.04373 (ICLR 2024). Official code: the authors' fork of
RL4LMs, ``tedmoskovitz/ConstrainedRL4LMs`` at commit 11ac8fe01be13e3d795d48c034976e08caa61a67
(``rl4lms/algorithms/constrained_ppo/constrained_ppo.py``: ``ConstrainedPPO``, PPO with an (N+1)-head critic,
per-stream GAE, multipliers stepped after every PPO minibatch; ``rl4lms/envs/text_generation/training_utils.py``:
``NelderMeadTrainer``; no LICENSE file, so nothing is copied from it: this module is written from a reading of that
code and the paper's abstract and reviews, which is all of the paper that was read).

Delta from TRL's ``RLOOTrainer`` (a practical TRL variant, a documented deviation from the official PPO loop, which
TRL 1.16 does not have): the N component rewards are kept un-summed, a KL stream r_KL = -kl_coef * sum_t (log pi_old
- log pi_ref) is added, each stream gets its own RLOO advantage and is normalised over the generation batch, the
streams are mixed with squashed Lagrange multipliers, and the multipliers step on the mean of each component reward
minus its threshold. Cadence (``multiplier_step``): by default once per *optimizer step*, on that step's completions,
with every micro-batch mixing its streams with the multipliers current at its step, as the official code steps them
after every PPO minibatch; ``generation`` steps them once per generation batch (mixed once, at generation). RLOO's
own ``beta`` is kept at 0 so the KL is not counted twice (it lives in the KL stream, weighted by ``kl_coef``).
``ConstrainedRLHFTrainer`` overrides ``_generate_and_score_completions`` (streams, advantages, the per-generation
multiplier step), ``_prepare_inputs`` / ``training_step`` (the per-optimizer-step mix and multiplier step) and
``_calculate_rewards`` (keeps the (B, N) rewards); ``ConstrainedGRPOTrainer`` is the same on ``GRPOTrainer``, with
GRPO's group-centred (and
``scale_rewards``-scaled) reward as each stream's advantage.

Problem. Component reward models r_1..r_N, thresholds theta ("proxy points": the component values beyond which
the hidden evaluation score drops), V_i(pi) = E_pi[r_i], V_KL(pi) = E_pi[r_KL]. Lagrangian

    L(pi, lambda) = V_KL + sum_i lambda_i (V_i - theta_i)        the policy ascends, the multipliers descend.

Formulations (``formulation``):

    mu     maximise V_KL  s.t.  V_i >= theta_i (inequality);  w_i = sigmoid(lambda_i) in (0, 1)   (mu-PPO)
    xi     maximise V_KL  s.t.  V_i  = theta_i (equality);    w_i = tanh(lambda_i)    in (-1, 1)  (xi-PPO)
    all    maximise V_KL + sum_i V_i s.t. V_i <= theta_i (upper bounds; "All-PPO": this definition is inferred
           from reviews of the paper and is UNVERIFIED; no All-PPO config ships with the official code)
    sat    PPO-SAT: one reward stream -sum_i (r_i - theta_i)^2 + r_KL per completion; no multipliers
    fixed  fixed weights (the baseline): one reward stream clip(sum_i w_i r_i) + r_KL, w = ``reward_weights``
           (default 1), clip = ``reward_clip_range`` (none by default), i.e. exactly TRL's RLOO with beta = kl_coef
           and the same ``normalize_advantages`` / ``reward_clip_range`` (sat clips its reward the same way)
    nm     xi with the thresholds tuned online by Nelder-Mead on a hidden evaluation score (NM-PPO)

Advantages (per stream s in {1..N, KL}: RLOO advantage, then normalised over the batch,
A_n = (A - mean) / (std_unbiased + 1e-8)); with squashed multipliers w (``squash_multipliers=True``)

    A_mix = (N - sum_i w_i) A_KL_n + sum_i w_i A_i_n          the weights sum to N: a fixed reward scale
    A_mix = A_KL_n + sum_i lambda_i A_i_n                     unsquashed (see the note in ``mix_advantages``)

and for ``all`` with upper-bound multipliers mu_i = sigmoid(lambda_i) (or mu_i = lambda_i clamped >= 0 unsquashed)

    A_mix = A_KL_n + sum_i (1 - mu_i) A_i_n                   a component stops being pushed once V_i > theta_i.

The single-stream baselines (fixed, sat) sum their reward with r_KL first, then take one RLOO advantage and
normalise it: there kl_coef sets how far the policy moves. In the mixed forms every stream is normalised, so
kl_coef (any positive scale of a stream) cancels: how far the policy moves is set by the multipliers alone.
``reward_clip_range`` applies only to the single-stream forms (the mixed ones refuse it).

Logging: TRL's completions table gets the advantages actually trained on and a ``mixed_reward`` column, and TRL's
``reward`` / ``reward_std`` metrics are those of the mixed reward (``mixed_rewards``: the single stream for fixed /
sat, (N - sum_i w_i) r_KL + sum_i w_i r_i for mu / xi / nm, r_KL + sum_i (1 - mu_i) r_i for all), not RLOO's stock
weighted sum.

Multiplier loss (violation detached), one SGD(momentum 0.1, lr 0.1) step with grad-norm clip 0.5 per optimizer step
(``multiplier_step: optimizer_step``, the official cadence) or per generation batch (``generation``):

    loss(lambda) = sum_i w_i(lambda) (V_i - theta_i)           mu, xi       (all: sum_i w_i (theta_i - V_i))

so a component above its threshold lowers its multiplier (xi: it can go negative and push the component back
down). Unsquashed inequality multipliers are clamped to >= 0 after each step. Init: one draw from N(0, 0.01^2)
shared by all constraints (as the official code), 0.5 when unsquashed. The values V_i must be the global batch
means (all-reduced over data-parallel ranks): the step is deterministic, so every rank then holds the same lambda.

NM-PPO: Nelder-Mead (reflection 1, expansion 2, contraction 0.5, shrink 0.5) over the threshold vector during
one continuing run; each function evaluation trains with the candidate thresholds, evaluates every
``nm_eval_every`` iterations and returns early once every constrained metric is within +-5% of its threshold; an
evaluation generates on the eval_split prompts with the current policy and scores them (``nm_score_on: eval_split``,
as the official code scores a held-out split; ``train`` scores the training rollouts since the last evaluation);
NM minimises -(evaluation score); evaluations are cached (a point within 5e-3 in every coordinate of a cached
one reuses its value); it stops once the iteration budget ``nm_iterations`` is spent or, after a shrink, the std
of the simplex values is below ``nm_tol`` (the official loop, ``nm_variant: official``; ``textbook`` is the other
variant). The search and its early-stopping evaluation are generic: ``trainers/nelder_mead.py``.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from posttrain import UserError
from posttrain.trainers.advantages import group_mean_advantages, rloo_advantages, work_dtype
from posttrain.trainers.method_state import MethodStateMixin
from posttrain.trainers.nelder_mead import VARIANTS as NM_VARIANTS
from posttrain.trainers.nelder_mead import EarlyStopEvaluation, NelderMead
from posttrain.trainers.trl_seam import disable_gradient_checkpointing, reference_model

FORMULATIONS = ("mu", "xi", "all", "sat", "fixed", "nm")
# formulations that need ``constraint_thresholds``
THRESHOLD_FORMULATIONS = ("mu", "xi", "all", "sat", "nm")
NORM_EPS = 1e-8
MULTIPLIER_STEPS = ("optimizer_step", "generation")
NM_SCORE_ON = ("eval_split", "train")


@dataclass
class ConstrainedArguments:
    """The constrained-RLHF settings (defaults: the official ``gpt2_constrained_ppo.yml``), mixed into the RLOO and
    GRPO configs below."""

    constraint_thresholds: list[float] | None = field(
        default=None,
        metadata={
            "help": "theta: one threshold (proxy point) per reward function, in reward_funcs order. Required "
            "for mu, xi, all, sat and nm (for nm: the starting point; the search box is nm_init_low/high)."
        },
    )
    formulation: str = field(
        default="xi",
        metadata={
            "help": "mu (maximise the KL reward s.t. V_i >= theta_i), xi (s.t. V_i = theta_i), all (composite "
            "reward s.t. V_i <= theta_i; definition inferred from reviews, unverified), sat (PPO-SAT: reward = "
            "-sum_i (r_i - theta_i)^2 - KL), fixed (the baseline: reward sum_i w_i r_i - KL with w = "
            "reward_weights, clipped to reward_clip_range, i.e. RLOO with beta = kl_coef), nm (xi with Nelder-Mead "
            "over "
            "the thresholds)."
        },
    )
    squash_multipliers: bool = field(
        default=True,
        metadata={
            "help": "squash the multipliers: tanh for equality (xi, nm), sigmoid otherwise (mu, all); the "
            "mixed weights then sum to N. False: raw multipliers (inequality ones clamped >= 0)."
        },
    )
    multiplier_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the multipliers."})
    multiplier_step: str = field(
        default="optimizer_step",
        metadata={
            "help": "when the multipliers step: optimizer_step (the official code's cadence, a step after every "
            "policy minibatch: one multiplier step per optimizer step on the component means of that step's "
            "completions over all ranks, and every micro-batch mixes its streams with the current "
            "multipliers) or generation (one step per generation batch on its means; the streams are mixed "
            "once, at generation). They differ when a generation batch feeds several optimizer steps "
            "(steps_per_generation > gradient_accumulation_steps, or num_iterations > 1)."
        },
    )
    multiplier_momentum: float = field(default=0.1, metadata={"help": "SGD momentum of the multipliers."})
    multiplier_grad_clip: float = field(
        default=0.5, metadata={"help": "gradient-norm clip of the multiplier step (over all multipliers)."}
    )
    multiplier_init_std: float = field(
        default=0.01,
        metadata={
            "help": "squashed multipliers start at one draw from N(0, std^2), shared by all constraints "
            "(as the official code); unsquashed ones start at 0.5."
        },
    )
    kl_coef: float = field(
        default=0.2,
        metadata={
            "help": "beta_KL of the KL stream r_KL = -kl_coef * sum_t (log pi_old - log pi_ref). RLOO's own "
            "`beta` must stay 0 so the KL is not counted twice. It cancels in the normalised mixed forms (mu, "
            "xi, all, nm) and matters only for the single-stream ones (fixed, sat)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "RLOO's KL-in-reward coefficient: must be 0 here (the KL is the KL stream, see kl_coef)."},
    )
    nm_iterations: int = field(
        default=100,
        metadata={
            "help": "NM-PPO budget: the search stops once this many training iterations were spent on "
            "function evaluations (or the simplex values' std < nm_tol)."
        },
    )
    nm_tol: float = field(
        default=0.01,
        metadata={
            "help": "NM-PPO stops when the std of the simplex values < this (tested after a shrink in the "
            "official variant, before every iteration in the textbook one)."
        },
    )
    nm_variant: str = field(
        default="official",
        metadata={
            "help": "NM-PPO: official (the Nelder-Mead loop of the official code, ConstrainedRL4LMs "
            "NelderMeadTrainer: spread test only after a shrink, expansion accepted against the best point, "
            "inside contraction only) or textbook (spread test before every iteration, expansion accepted "
            "against the reflected point, outside and inside contractions). See trainers/nelder_mead.py."
        },
    )
    nm_eval_every: int = field(
        default=5,
        metadata={"help": "NM-PPO: evaluate every this many training iterations within a function evaluation."},
    )
    nm_steps_per_eval: int | None = field(
        default=None,
        metadata={
            "help": "NM-PPO: training iterations per function evaluation at most (default nm_iterations // 10, "
            "as the official code); an evaluation returns early once every constraint is within +-5%."
        },
    )
    nm_init_low: list[float] | None = field(
        default=None,
        metadata={
            "help": "NM-PPO: lower corner of the box the initial simplex is drawn from (one value per reward "
            "function); default 0.9 * constraint_thresholds."
        },
    )
    nm_init_high: list[float] | None = field(
        default=None,
        metadata={"help": "NM-PPO: upper corner of the initial-simplex box; default 1.1 * constraint_thresholds."},
    )
    nm_eval_function: str | None = field(
        default=None,
        metadata={
            "help": "NM-PPO: name of the evaluation (score, higher is better) the trainer resolves; NM "
            "minimises -score. Required for formulation=nm."
        },
    )
    nm_score_on: str = field(
        default="eval_split",
        metadata={
            "help": "NM-PPO: where an evaluation's score and constraint values come from. eval_split (as the "
            "official code, which scores a held-out split): at each evaluation point the policy generates on "
            "every eval_split prompt, scored by nm_eval_function and the reward functions; needs eval_split. "
            "train: the training completions generated since the last evaluation point (a lagging window of "
            "training rollouts, no extra generation)."
        },
    )
    nm_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "NM-PPO with nm_score_on: eval_split: score on the first this many eval_split prompts "
            "(default all of them)."
        },
    )
    nm_seed: int | None = field(
        default=None, metadata={"help": "NM-PPO: seed of the initial simplex (default: the run's seed)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"formulation={self.formulation!r}; valid: {', '.join(FORMULATIONS)}")
        if getattr(self, "reward_clip_range", None) and self.formulation not in ("fixed", "sat"):
            raise ValueError(
                f"reward_clip_range={self.reward_clip_range}: it clips the one summed reward of the "
                f"single-stream formulations (fixed, sat, as RLOO does); formulation={self.formulation!r} "
                "mixes per-stream advantages"
            )
        if self.beta != 0.0:
            raise ValueError(
                f"beta={self.beta}: constrained RLHF keeps RLOO's KL-in-reward coefficient at 0 (the KL "
                "is its own stream, weighted by kl_coef); set kl_coef instead"
            )
        if self.constraint_thresholds is not None:
            self.constraint_thresholds = [float(t) for t in self.constraint_thresholds]
            if not self.constraint_thresholds:
                raise ValueError("constraint_thresholds is empty")
            if not all(math.isfinite(t) for t in self.constraint_thresholds):
                raise ValueError(f"constraint_thresholds must be finite (got {self.constraint_thresholds})")
        if self.formulation in THRESHOLD_FORMULATIONS and self.constraint_thresholds is None:
            raise ValueError(f"formulation={self.formulation!r} needs constraint_thresholds (one per reward function)")
        if (
            self.constraint_thresholds is not None
            and self.reward_weights is not None
            and len(self.constraint_thresholds) != len(self.reward_weights)
        ):
            raise ValueError(
                f"{len(self.constraint_thresholds)} constraint_thresholds but {len(self.reward_weights)} "
                "reward_weights: both need one value per reward function"
            )
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0 (got {self.kl_coef})")
        if self.multiplier_step not in MULTIPLIER_STEPS:
            raise ValueError(f"multiplier_step={self.multiplier_step!r}; valid: {', '.join(MULTIPLIER_STEPS)}")
        if not (self.multiplier_lr > 0 and math.isfinite(self.multiplier_lr)):
            raise ValueError(f"multiplier_lr must be > 0 (got {self.multiplier_lr})")
        if not 0 <= self.multiplier_momentum < 1:
            raise ValueError(f"multiplier_momentum must be in [0, 1) (got {self.multiplier_momentum})")
        if not self.multiplier_grad_clip > 0:
            raise ValueError(f"multiplier_grad_clip must be > 0 (got {self.multiplier_grad_clip})")
        if not (self.multiplier_init_std >= 0 and math.isfinite(self.multiplier_init_std)):
            raise ValueError(f"multiplier_init_std must be >= 0 (got {self.multiplier_init_std})")
        if self.nm_iterations < 1:
            raise ValueError(f"nm_iterations must be >= 1 (got {self.nm_iterations})")
        if not self.nm_tol > 0:
            raise ValueError(f"nm_tol must be > 0 (got {self.nm_tol})")
        if self.nm_score_on not in NM_SCORE_ON:
            raise ValueError(f"nm_score_on={self.nm_score_on!r}; valid: {', '.join(NM_SCORE_ON)}")
        if self.nm_eval_samples is not None and self.nm_eval_samples < 1:
            raise ValueError(f"nm_eval_samples must be >= 1 (got {self.nm_eval_samples})")
        if self.nm_variant not in NM_VARIANTS:
            raise ValueError(f"nm_variant={self.nm_variant!r}; valid: {', '.join(NM_VARIANTS)}")
        if self.nm_eval_every < 1:
            raise ValueError(f"nm_eval_every must be >= 1 (got {self.nm_eval_every})")
        if self.nm_steps_per_eval is not None and self.nm_steps_per_eval < 1:
            raise ValueError(f"nm_steps_per_eval must be >= 1 (got {self.nm_steps_per_eval})")
        if self.formulation == "nm":
            n = len(self.constraint_thresholds)
            low, high = self.nm_box()
            if len(low) != n or len(high) != n:
                raise ValueError(
                    f"nm_init_low/nm_init_high need {n} values (one per constraint threshold), got "
                    f"{len(low)} and {len(high)}"
                )
            if not all(lo < hi for lo, hi in zip(low, high)):
                raise ValueError(f"nm_init_low must be < nm_init_high in every coordinate (got {low}, {high})")
            if self.nm_eval_function is None:
                raise ValueError("formulation='nm' needs nm_eval_function (the evaluation score NM maximises)")

    # --------------------------------------------------------------------------------------------- helpers

    @property
    def equality(self) -> bool:
        """True for the equality formulations (xi, nm)."""
        return self.formulation in ("xi", "nm")

    def nm_box(self) -> tuple[list[float], list[float]]:
        """The initial-simplex box (low, high): nm_init_low/high, defaulting to thresholds * 0.9 / * 1.1."""
        th = self.constraint_thresholds or []
        low = [min(0.9 * t, 1.1 * t) for t in th] if self.nm_init_low is None else [float(x) for x in self.nm_init_low]
        high = (
            [max(0.9 * t, 1.1 * t) for t in th] if self.nm_init_high is None else [float(x) for x in self.nm_init_high]
        )
        return low, high

    @property
    def nm_eval_steps(self) -> int:
        """Training iterations per NM function evaluation (nm_steps_per_eval, default nm_iterations // 10)."""
        return self.nm_steps_per_eval if self.nm_steps_per_eval is not None else max(1, self.nm_iterations // 10)

    def check_data_args(self, data_args) -> None:
        """Checks against the recipe's data keys, when the recipe is read (before any model loads)."""
        if self.formulation == "nm" and self.nm_score_on == "eval_split" and not data_args.eval_split:
            raise ValueError(NM_NEEDS_EVAL_SPLIT)

    def validate_for(self, n_reward_funcs: int) -> None:
        """Check the per-reward-function lists against the number of reward functions (the trainer calls this)."""
        for name in ("constraint_thresholds", "reward_weights", "nm_init_low", "nm_init_high"):
            value = getattr(self, name)
            if value is not None and len(value) != n_reward_funcs:
                raise ValueError(
                    f"{name} has {len(value)} values but there are {n_reward_funcs} reward functions "
                    "(one value per reward function, in reward_funcs order)"
                )


NM_NEEDS_EVAL_SPLIT = (
    "formulation='nm' scores each Nelder-Mead evaluation on the eval_split prompts (as the "
    "official code scores a held-out split): set eval_split, or nm_score_on: train to score the "
    "training rollouts instead"
)


@dataclass
class ConstrainedRLHFConfig(ConstrainedArguments, RLOOConfig):
    """RLOOConfig plus the constrained-RLHF settings: the practical TRL variant (RLOO advantages per stream)."""


@dataclass
class ConstrainedGRPOConfig(ConstrainedArguments, GRPOConfig):
    """GRPOConfig plus the constrained-RLHF settings: the same method with GRPO's group-mean baseline per stream."""


# ----------------------------------------------------------------------------------------------- pure math


def normalise_stream(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / (std_unbiased + 1e-8) over dim 0 (per column for a 2-D input). A batch of one gives zeros."""
    if x.shape[0] < 2:
        return torch.zeros_like(x)
    return (x - x.mean(0)) / (x.std(0, unbiased=True) + NORM_EPS)


def squash_multipliers(multipliers: torch.Tensor, equality: bool, squash: bool = True) -> torch.Tensor:
    """tanh(lambda) for equality constraints, sigmoid(lambda) for inequality ones, identity when not squashed."""
    if not squash:
        return multipliers
    return torch.tanh(multipliers) if equality else torch.sigmoid(multipliers)


def _check_streams(component_adv, kl_adv, multipliers):
    if component_adv.dim() != 2:
        raise ValueError(f"component_adv must be (B, N), got shape {tuple(component_adv.shape)}")
    B, N = component_adv.shape
    if kl_adv.shape != (B,):
        raise ValueError(f"kl_adv must be (B,) = ({B},), got shape {tuple(kl_adv.shape)}")
    if multipliers.shape != (N,):
        raise ValueError(f"multipliers must be (N,) = ({N},), got shape {tuple(multipliers.shape)}")


def mix_advantages(
    component_adv: Tensor, kl_adv: Tensor, multipliers: Tensor, equality: bool, squash: bool = True
) -> Tensor:
    """The mixed advantage (B,) of xi-/mu-PPO from per-stream advantages.

    component_adv (B, N): one advantage stream per component reward; kl_adv (B,): the KL stream; multipliers
    (N,): the raw Lagrange multipliers lambda (detached here: the policy loss does not train them). Each stream is
    normalised over the batch, (x - mean) / (std_unbiased + 1e-8), per column. Squashed (w = tanh(lambda) if
    ``equality`` else sigmoid(lambda)): A = (N - sum w) A_KL_n + sum_i w_i A_i_n, the weights sum to N.
    Unsquashed: A = A_KL_n + sum_i lambda_i A_i_n (``fixed`` weights use this branch).
    """
    dtype = work_dtype(component_adv, kl_adv)
    multipliers = torch.as_tensor(multipliers, device=component_adv.device)
    _check_streams(component_adv, kl_adv, multipliers)
    A_c = normalise_stream(component_adv.to(dtype))
    A_kl = normalise_stream(kl_adv.to(dtype))
    w = squash_multipliers(multipliers.detach().to(dtype), equality, squash)
    mixed_components = A_c @ w
    if squash:
        return (A_c.shape[1] - w.sum()) * A_kl + mixed_components
    # Official-code quirk (ConstrainedRL4LMs, constrained_ppo.py): its unsquashed branch mixes with ``lagrange[1:]``,
    # dropping the first
    # multiplier (a leftover; with N multipliers it does not even line up with the N streams). Here every
    # multiplier weighs its own stream, the sensible reading of the Lagrangian.
    return A_kl + mixed_components


def mix_upper_bound_advantages(
    component_adv: Tensor, kl_adv: Tensor, multipliers: Tensor, squash: bool = True
) -> Tensor:
    """The ``all`` formulation (composite objective V_KL + sum_i V_i s.t. V_i <= theta_i), shape (B,).

    Lagrangian V_KL + sum_i V_i - sum_i mu_i (V_i - theta_i) with mu_i >= 0: component i is weighed by
    1 - mu_i, with mu_i = sigmoid(lambda_i) in (0, 1) when squashed (lambda_i clamped >= 0 by the multiplier
    step otherwise): A = A_KL_n + sum_i (1 - mu_i) A_i_n. This form is our choice; the paper's All-PPO could
    not be read (its definition here is inferred from reviews, unverified).
    """
    dtype = work_dtype(component_adv, kl_adv)
    multipliers = torch.as_tensor(multipliers, device=component_adv.device)
    _check_streams(component_adv, kl_adv, multipliers)
    A_c = normalise_stream(component_adv.to(dtype))
    A_kl = normalise_stream(kl_adv.to(dtype))
    mu = squash_multipliers(multipliers.detach().to(dtype), equality=False, squash=squash)
    return A_kl + A_c @ (1 - mu)


def weigh_streams(
    formulation: str, component_adv_n: Tensor, kl_adv_n: Tensor, multipliers: Tensor, squash: bool = True
) -> Tensor:
    """The mix of streams (B, N) and (B,) with the multipliers (detached), as given (not normalised here): on the
    normalised advantages it is the last step of ``mix_advantages`` (mu, xi, nm) or ``mix_upper_bound_advantages``
    (all), and the trainer re-mixes every micro-batch with the current multipliers through it when they step per
    optimizer step; on the raw rewards it is ``mixed_rewards``."""
    dtype = work_dtype(component_adv_n, kl_adv_n)
    A_c, A_kl = component_adv_n.to(dtype), kl_adv_n.to(dtype)
    lam = torch.as_tensor(multipliers).detach().to(dtype=dtype, device=A_c.device)
    if formulation == "all":
        return A_kl + A_c @ (1 - squash_multipliers(lam, equality=False, squash=squash))
    w = squash_multipliers(lam, formulation in ("xi", "nm"), squash)
    return ((A_c.shape[1] - w.sum()) if squash else 1.0) * A_kl + A_c @ w


def multiplier_loss(
    multipliers: Tensor,
    component_values: Tensor,
    thresholds: Tensor | Sequence[float],
    equality: bool,
    squash: bool = True,
    *,
    upper_bound: bool = False,
) -> Tensor:
    """sum_i squash(lambda)_i (V_i - theta_i), a scalar whose gradient reaches only the multipliers.

    component_values (N,): the constraint values (batch means of the component rewards), thresholds (N,).
    Descending it lowers the multiplier of a component that is above its threshold. ``upper_bound=True``
    (the ``all`` formulation) flips the violation: sum_i sigmoid(lambda)_i (theta_i - V_i).
    """
    values = torch.as_tensor(component_values, dtype=multipliers.dtype, device=multipliers.device).detach()
    theta = torch.as_tensor(thresholds, dtype=multipliers.dtype, device=multipliers.device).detach()
    if values.shape != multipliers.shape or theta.shape != multipliers.shape:
        raise ValueError(
            f"multipliers {tuple(multipliers.shape)}, component_values {tuple(values.shape)} and "
            f"thresholds {tuple(theta.shape)} must all be (N,)"
        )
    violation = theta - values if upper_bound else values - theta
    return (squash_multipliers(multipliers, equality and not upper_bound, squash) * violation).sum()


def sat_rewards(component_rewards: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """PPO-SAT reward per completion (B,): -sum_i (r_i - theta_i)^2, from component rewards (B, N)."""
    theta = torch.as_tensor(thresholds, dtype=component_rewards.dtype, device=component_rewards.device)
    return -((component_rewards - theta) ** 2).sum(-1)


def single_stream_rewards(
    formulation: str,
    component_rewards: Tensor,
    kl_rewards: Tensor,
    multipliers: Tensor | None = None,
    thresholds: Sequence[float] | None = None,
    clip_range: float | None = None,
) -> Tensor:
    """The one reward stream (B,) of the single-stream baselines: fixed sum_i w_i r_i (w = multipliers, default
    ones) or sat -sum_i (r_i - theta_i)^2, clipped to ``clip_range`` = (min, max) when given, then + r_KL: the
    order of TRL 1.16's ``RLOOTrainer`` (weighted sum, ``reward_clip_range``, then the KL penalty)."""
    if formulation == "sat":
        if thresholds is None:
            raise ValueError("formulation='sat' needs thresholds")
        reward = sat_rewards(component_rewards, thresholds)
    elif formulation == "fixed":
        n = component_rewards.shape[1]
        w = torch.ones(n) if multipliers is None else torch.as_tensor(multipliers).detach()
        if w.shape != (n,):
            raise ValueError(f"fixed weights must be (N,) = ({n},), got shape {tuple(w.shape)}")
        reward = component_rewards @ w.to(component_rewards)
    else:
        raise ValueError(f"formulation={formulation!r} has no single reward stream (fixed and sat do)")
    if clip_range:
        reward = reward.clamp(min=clip_range[0], max=clip_range[1])
    return reward + kl_rewards.to(reward)


def mixed_rewards(
    formulation: str,
    component_rewards: Tensor,
    kl_rewards: Tensor,
    multipliers: Tensor | None = None,
    thresholds: Sequence[float] | None = None,
    squash: bool = True,
    clip_range: float | None = None,
) -> Tensor:
    """The per-completion reward (B,) each formulation optimises, with the multipliers in use (for logging).

    fixed / sat: the single stream (``single_stream_rewards``). mu / xi / nm: the Lagrangian reward with the mixing
    weights, (N - sum_i w_i) r_KL + sum_i w_i r_i (squashed) or r_KL + sum_i lambda_i r_i (unsquashed); all:
    r_KL + sum_i (1 - mu_i) r_i. The mixed advantage is built from these streams after per-stream normalisation, so
    it is not the RLOO advantage of this reward; the reward is what the weights make of the streams' raw values.
    """
    if formulation in ("fixed", "sat"):
        return single_stream_rewards(formulation, component_rewards, kl_rewards, multipliers, thresholds, clip_range)
    return weigh_streams(formulation, component_rewards, kl_rewards, multipliers, squash)  # the same weights


def formulation_advantages(
    formulation: str,
    component_rewards: Tensor,
    kl_rewards: Tensor,
    num_generations: int,
    multipliers: Tensor | None = None,
    thresholds: Sequence[float] | None = None,
    squash: bool = True,
    *,
    baseline: Callable[[Tensor, int], Tensor] | None = None,
    normalise_single: float | None = NORM_EPS,
    clip_range: float | None = None,
) -> Tensor:
    """Sequence advantages (B,) for any formulation, from per-completion rewards.

    component_rewards (B, N), kl_rewards (B,) (-kl_coef * sum_t (log pi_old - log pi_ref)), the num_generations
    completions of a prompt consecutive. ``baseline(rewards, num_generations)`` turns rewards ((B,) or (B, N)) into
    per-stream advantages: ``rloo_advantages`` by default, ``group_mean_advantages`` for the GRPO twin. mu / xi / nm
    / all: every stream gets its advantage, then ``mix_advantages`` (multipliers = the raw lambda; equality for xi
    and nm) or ``mix_upper_bound_advantages`` (all) normalises and mixes them. fixed / sat: ONE stream,
    ``single_stream_rewards`` (sum_i w_i r_i or -sum_i (r_i - theta_i)^2, clipped to ``clip_range``, + r_KL); its
    advantage is normalised over the batch as (A - mean) / (std_unbiased + normalise_single) (None: not normalised).
    With the RLOO baseline, ``normalise_single=1e-4`` (or None) and ``clip_range`` = ``reward_clip_range`` this is
    TRL's RLOO with beta = kl_coef and the same normalize_advantages.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation={formulation!r}; valid: {', '.join(FORMULATIONS)}")
    if component_rewards.dim() != 2 or kl_rewards.shape != component_rewards.shape[:1]:
        raise ValueError(
            f"component_rewards must be (B, N) and kl_rewards (B,), got {tuple(component_rewards.shape)} "
            f"and {tuple(kl_rewards.shape)}"
        )
    baseline = rloo_advantages if baseline is None else baseline
    if formulation in ("fixed", "sat"):
        reward = single_stream_rewards(formulation, component_rewards, kl_rewards, multipliers, thresholds, clip_range)
        adv = baseline(reward, num_generations)
        if normalise_single is None or adv.shape[0] < 2:
            return adv
        return (adv - adv.mean()) / (adv.std(unbiased=True) + normalise_single)
    if clip_range:
        raise ValueError(
            f"reward_clip_range clips the one summed reward of the single-stream formulations (fixed, "
            f"sat); formulation={formulation!r} mixes per-stream advantages"
        )
    if multipliers is None:
        raise ValueError(f"formulation={formulation!r} needs the multipliers")
    A_c = baseline(component_rewards, num_generations)
    A_kl = baseline(kl_rewards, num_generations)
    if formulation == "all":
        return mix_upper_bound_advantages(A_c, A_kl, multipliers, squash=squash)
    return mix_advantages(A_c, A_kl, multipliers, equality=formulation in ("xi", "nm"), squash=squash)


# ----------------------------------------------------------------------------------------- multiplier state


class LagrangeMultipliers:
    """The Lagrange multipliers lambda (N,), their SGD(momentum) optimiser and the one-step update.

    ``step(values, thresholds)`` descends ``multiplier_loss`` once: gradient-norm clip ``grad_clip``, then
    SGD(lr, momentum); unsquashed inequality (and upper-bound) multipliers are clamped to >= 0 afterwards.
    Squashed multipliers start at ONE draw from N(0, init_std^2) shared by every constraint (as the official
    code), unsquashed ones at 0.5, or at ``init`` when given. ``fixed=True`` freezes them (``step`` is a no-op):
    the ``fixed`` baseline, with ``init`` = the fixed weights and ``squash=False``.

    Distributed runs: the update is deterministic given its inputs, so ranks stay identical when they all pass
    the same (all-reduced) component values; a resume loads rank 0's copy on every rank (``method_state``).
    ``state_dict``/``load_state_dict`` include the momentum buffer, so a resumed run continues exactly. lambda is
    float64 (N is tiny).
    """

    def __init__(
        self,
        n,
        equality,
        squash=True,
        lr=0.1,
        momentum=0.1,
        grad_clip=0.5,
        init_std=0.01,
        init=None,
        fixed=False,
        upper_bound=False,
        generator=None,
        dtype=torch.float64,
    ):
        if n < 1:
            raise ValueError(f"need at least one constraint (got n={n})")
        if equality and upper_bound:
            raise ValueError("upper-bound (all) multipliers are inequality multipliers: equality must be False")
        self.n, self.equality, self.squash = int(n), bool(equality), bool(squash)
        self.lr, self.momentum, self.grad_clip = float(lr), float(momentum), float(grad_clip)
        self.fixed, self.upper_bound = bool(fixed), bool(upper_bound)
        if init is not None:
            start = torch.as_tensor(init, dtype=dtype).reshape(-1).clone()
            if start.numel() == 1:
                start = start.expand(self.n).clone()
            if start.shape != (self.n,):
                raise ValueError(f"init has {start.numel()} values for {self.n} constraints")
        elif squash:
            draw = torch.randn((), generator=generator, dtype=torch.float64) * init_std
            start = draw.to(dtype).expand(self.n).clone()  # one draw shared by all constraints
        else:
            start = torch.full((self.n,), 0.5, dtype=dtype)
        self.lam = start.requires_grad_(not self.fixed)
        self.optimizer = (
            None if self.fixed else torch.optim.SGD([self.lam], lr=self.lr, momentum=self.momentum, foreach=False)
        )

    @classmethod
    def from_config(cls, config: ConstrainedRLHFConfig, n: int, generator=None):
        """The multipliers a formulation needs (None for ``sat``, which has none)."""
        f = config.formulation
        if f == "sat":
            return None
        if f == "fixed":
            weights = config.reward_weights if config.reward_weights is not None else [1.0] * n
            return cls(n, equality=False, squash=False, init=weights, fixed=True)
        return cls(
            n,
            equality=config.equality,
            squash=config.squash_multipliers,
            lr=config.multiplier_lr,
            momentum=config.multiplier_momentum,
            grad_clip=config.multiplier_grad_clip,
            init_std=config.multiplier_init_std,
            upper_bound=(f == "all"),
            generator=generator,
        )

    def weights(self) -> torch.Tensor:
        """The squashed multipliers (tanh / sigmoid, identity if unsquashed), detached."""
        with torch.no_grad():
            return squash_multipliers(self.lam.detach(), self.equality, self.squash).clone()

    def loss(self, component_values, thresholds) -> torch.Tensor:
        return multiplier_loss(
            self.lam, component_values, thresholds, self.equality, self.squash, upper_bound=self.upper_bound
        )

    def step(self, component_values, thresholds) -> dict:
        """One multiplier step on the (global) constraint values; returns the loss and the pre-clip grad norm."""
        if self.fixed:
            return {"loss": 0.0, "grad_norm": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(component_values, thresholds)
        loss.backward()
        with torch.no_grad():  # = torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1)
            grad_norm = self.lam.grad.norm()
            self.lam.grad.mul_(torch.clamp(self.grad_clip / (grad_norm + 1e-6), max=1.0))
        self.optimizer.step()
        if not self.squash and not self.equality:
            with torch.no_grad():
                self.lam.clamp_(min=0.0)
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}

    def state_dict(self) -> dict:
        return {
            "lam": self.lam.detach().clone(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "settings": {
                "n": self.n,
                "equality": self.equality,
                "squash": self.squash,
                "fixed": self.fixed,
                "upper_bound": self.upper_bound,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "n": self.n,
            "equality": self.equality,
            "squash": self.squash,
            "fixed": self.fixed,
            "upper_bound": self.upper_bound,
        }
        if state["settings"] != mine:
            raise ValueError(f"multiplier state {state['settings']} does not match this run's {mine}")
        with torch.no_grad():
            self.lam.copy_(state["lam"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def log_dict(self, names: Sequence[str] | None = None, prefix: str = "constrained/") -> dict:
        names = names or [str(i) for i in range(self.n)]
        lam, w = self.lam.detach().tolist(), self.weights().tolist()
        out = {f"{prefix}lambda/{k}": v for k, v in zip(names, lam)}
        out.update({f"{prefix}weight/{k}": v for k, v in zip(names, w)})
        return out


# ----------------------------------------------------------------------------------------------- NM-PPO


# ------------------------------------------------------------------------------------------------- trainers


class NMSetupError(UserError, ValueError):
    """An NM-PPO run set up without what it needs (the CLI prints it as one line, exit code 2)."""


class _ConstrainedMixin(MethodStateMixin):
    """The constrained-RLHF delta, shared by the RLOO and GRPO trainers: overrides ``_generate_and_score_completions``
    (the advantages and the multiplier step) and ``_calculate_rewards`` (to keep the component rewards un-summed);
    its state (``method_state``) goes into every checkpoint. ``_stream_baseline`` is the per-stream advantage of the
    parent method."""

    def __init__(self, model, reward_funcs, args=None, **kwargs):
        if not isinstance(args, ConstrainedArguments):
            raise TypeError(f"{type(self).__name__} needs a {ConstrainedArguments.__name__} config (got {type(args)})")
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        args.validate_for(len(funcs))
        # TRL builds and prepares a reference model (plain, PEFT, DeepSpeed or FSDP) only for beta != 0: let it,
        # then zero beta so TRL never adds the KL to the reward or loss itself: it is the KL stream here.
        args.beta = args.kl_coef
        try:
            super().__init__(model, funcs, args=args, **kwargs)
        finally:
            args.beta = 0.0
        self.beta = 0.0
        n = len(funcs)
        self.thresholds = list(args.constraint_thresholds or [0.0] * n)
        self.multipliers = LagrangeMultipliers.from_config(args, n, generator=torch.Generator().manual_seed(args.seed))
        self.nm = self.nm_run = self.nm_eval = None
        self._nm_window: list[tuple[float, list[float]]] = []
        self._nm_scoring = False  # True while the eval split is being scored for NM
        if args.formulation == "nm":
            from posttrain.trainers.rewards import REWARDS

            if args.nm_eval_function not in REWARDS:
                raise ValueError(
                    f"nm_eval_function={args.nm_eval_function!r} is not a reward function; valid: "
                    f"{', '.join(sorted(REWARDS))}"
                )
            self.nm_eval = REWARDS[args.nm_eval_function][1](args)
            if args.nm_score_on == "eval_split" and self.eval_dataset is None:
                raise NMSetupError(NM_NEEDS_EVAL_SPLIT)
            low, high = args.nm_box()
            self.nm = NelderMead(
                low,
                high,
                tol=args.nm_tol,
                max_iterations=args.nm_iterations,
                seed=args.seed if args.nm_seed is None else args.nm_seed,
                variant=args.nm_variant,
            )
            self._nm_next()

    # --------------------------------------------------------------------------------------- rewards

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL gathers the (B, N) component rewards of the whole generation batch over processes: keep them.
        self._component_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.nm_eval is not None and (
            self._nm_scoring or (self.model.training and self.args.nm_score_on == "train")
        ):
            columns = {
                k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")
            }
            score = self.nm_eval(
                prompts=prompts, completions=completions, completion_ids=completion_ids_list, **columns
            )
            self._nm_scores = self.accelerator.gather(
                torch.tensor(score, dtype=torch.float32, device=self.accelerator.device)
            )
        return self._component_rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation keeps the parent's advantages (they are only logged)
            self._logs["extra"]["mixed_reward"].extend([None] * self._component_rewards.size(0))
            return out
        args, rewards = self.args, self._component_rewards.double()
        if torch.isnan(rewards).any():
            bad = [n for n, col in zip(self.reward_func_names, rewards.isnan().any(0).tolist()) if col]
            raise ValueError(
                f"reward function(s) {', '.join(bad)} returned None for some completions: constrained "
                "RLHF needs every component reward of every completion"
            )
        kl = self.accelerator.gather(self._sequence_kl(out)).double()  # (B,) sum_t log pi_old - log pi_ref
        lam = None if self.multipliers is None else self.multipliers.lam
        clip = getattr(args, "reward_clip_range", None)  # RLOO's (fixed, sat); GRPOConfig has none
        advantages = formulation_advantages(
            args.formulation,
            rewards,
            -args.kl_coef * kl,
            self.num_generations,
            lam,
            self.thresholds,
            args.squash_multipliers,
            baseline=self._stream_baseline,
            normalise_single=1e-4 if getattr(args, "normalize_advantages", False) else None,
            clip_range=clip,
        )
        rank, b = self.accelerator.process_index, out["completion_ids"].size(0)
        out["advantages"] = advantages[rank * b : (rank + 1) * b].to(out["advantages"].dtype)
        mixed = mixed_rewards(
            args.formulation,
            rewards,
            -args.kl_coef * kl,
            lam,
            self.thresholds,
            args.squash_multipliers,
            clip_range=clip,
        )
        self._log_mixed(advantages, mixed)
        if self._per_step_multipliers:
            # carried with the completions through TRL's shuffle and split: every micro-batch re-mixes its normalised
            # streams with the multipliers current at its optimizer step, and the step uses its component rewards
            streams = torch.cat(
                [
                    normalise_stream(self._stream_baseline(rewards, self.num_generations)),
                    normalise_stream(self._stream_baseline(-args.kl_coef * kl, self.num_generations))[:, None],
                ],
                1,
            )
            out["constrained_streams"] = streams[rank * b : (rank + 1) * b].float()
            out["constrained_components"] = rewards[rank * b : (rank + 1) * b].float()

        values = rewards.mean(0)  # the constraint values V_i: global batch means (identical on every rank)
        metrics = {"constrained/kl": kl.mean().item()}
        for name, v, t in zip(self.reward_func_names, values.tolist(), self.thresholds):
            metrics[f"constrained/value/{name}"] = v
            if args.formulation != "fixed":
                metrics[f"constrained/threshold/{name}"] = t
        if self.multipliers is not None and not self._per_step_multipliers:
            metrics.update(self.multipliers.log_dict(self.reward_func_names))  # the weights used for this batch
            metrics["constrained/multiplier_loss"] = self.multipliers.step(values, self.thresholds)["loss"]
        if self.nm is not None:
            self._nm_tick(values.tolist(), metrics)
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        return out

    @property
    def _per_step_multipliers(self) -> bool:
        """True when learnable multipliers step once per optimizer step (``multiplier_step: optimizer_step``)."""
        return (
            self.multipliers is not None
            and not self.multipliers.fixed
            and self.args.multiplier_step == "optimizer_step"
        )

    def _prepare_inputs(self, generation_batch):
        """Per-optimizer-step multipliers: mix this micro-batch's normalised streams with the current multipliers and
        add its component rewards to the running sums of this optimizer step."""
        inputs = super()._prepare_inputs(generation_batch)
        streams = inputs.get("constrained_streams")
        if streams is None:
            return inputs
        components = inputs["constrained_components"]
        # a shallow copy without the carried tensors: TRL reuses the buffered dict for num_iterations > 1
        inputs = {k: v for k, v in inputs.items() if k not in ("constrained_streams", "constrained_components")}
        inputs["advantages"] = weigh_streams(
            self.args.formulation, streams[:, :-1], streams[:, -1], self.multipliers.lam, self.args.squash_multipliers
        ).to(inputs["advantages"].dtype)
        acc = torch.cat(
            [components.double().sum(0).cpu(), torch.tensor([float(components.size(0))], dtype=torch.float64)]
        )
        self._step_components = acc if getattr(self, "_step_components", None) is None else self._step_components + acc
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """After the last micro-batch of an optimizer step, one multiplier step (per-optimizer-step cadence) on the
        component means of that step's completions, summed over its micro-batches and all ranks (so every rank takes
        the same step)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if (
            getattr(self, "_step_components", None) is not None
            and self._step % self.current_gradient_accumulation_steps == 0
        ):  # TRL's count of micro-batches
            self._multiplier_step()
        return loss

    def _multiplier_step(self):
        total = self.accelerator.reduce(self._step_components.to(self.accelerator.device), reduction="sum").cpu()
        self._step_components = None
        values = total[:-1] / total[-1]
        metrics = self.multipliers.log_dict(self.reward_func_names)  # the weights this step trained with
        metrics["constrained/multiplier_loss"] = self.multipliers.step(values, self.thresholds)["loss"]
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)

    def _log_mixed(self, advantages, mixed):
        """Log what this batch trains on, not the parent's stock numbers: the completions table's ``advantage``
        column gets the advantages actually used (replacing the parent's entries for this batch) and a
        ``mixed_reward`` column (``mixed_rewards``); TRL's ``reward`` / ``reward_std`` metrics become the mixed
        reward's mean and std (the weighted sum of the components without the KL that TRL logs stays available as
        ``rewards/<name>/mean``)."""
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        self._logs["extra"]["mixed_reward"].extend(mixed.tolist())
        metrics = self._metrics["train"]
        if metrics["reward"]:
            metrics["reward"][-1] = mixed.mean().item()
            metrics["reward_std"][-1] = mixed.std().item() if mixed.numel() > 1 else 0.0

    @torch.no_grad()
    def _sequence_kl(self, out) -> torch.Tensor:
        """sum_t (log pi_old - log pi_ref) per local completion; zeros when kl_coef = 0 (no reference model)."""
        mask = out["completion_mask"]
        if self.args.kl_coef == 0:
            return torch.zeros(mask.size(0), device=mask.device)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], mask], 1)
        keep, batch = mask.size(1), self.args.per_device_train_batch_size

        def logps(model):
            return self._get_per_token_logps_and_entropies(model, ids, attention, keep, batch_size=batch)[0]

        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if "old_logps" in out:  # RLOO: sum_t log pi_old, already masked
                policy = out["old_logps"]
            else:  # GRPO keeps old per-token log-probs only off-policy; on-policy they are this model's
                old = out.get("old_per_token_logps")
                policy = ((logps(self.model) if old is None else old) * mask).sum(1)
            # the reference branch of TRL 1.16's RLOOTrainer._generate_and_score_completions
            with reference_model(self) as reference:
                ref = logps(reference)
        return policy - (ref * mask).sum(1)

    # ------------------------------------------------------------------------------------------ NM-PPO

    def _nm_next(self):
        """Start the next NM function evaluation (or, once the search is done, settle on its best point)."""
        theta = self.nm.ask()
        if theta is None:
            self.thresholds, self.nm_run = self.nm.best_point.tolist(), None
            return
        self.thresholds = theta.tolist()
        self.nm_run = EarlyStopEvaluation(self.thresholds, self.args.nm_eval_steps, self.args.nm_eval_every)

    def _nm_tick(self, values, metrics):
        """One training iteration (generation batch) of the current NM evaluation. At an evaluation point the score
        and the constraint values are, with ``nm_score_on: eval_split`` (default), the means over completions the
        current policy generates on every eval_split prompt (``_nm_score_eval_split``); with ``train``, the means
        over the training completions generated since the last evaluation point."""
        if self.nm_run is None:
            return
        if self.args.nm_score_on == "eval_split":
            evaluate = self._nm_score_eval_split
        else:
            self._nm_window.append((self._nm_scores.mean().item(), values))

            def evaluate():
                scores, comps = zip(*self._nm_window)
                self._nm_window.clear()
                return float(np.mean(scores)), np.mean(comps, 0).tolist()

        result = self.nm_run.tick(evaluate)
        if result is not None:
            self.nm.tell(result.score, cost=result.iterations)
            metrics.update(
                {
                    "nm/score": result.score,
                    "nm/evaluations": float(len(self.nm.history)),
                    "nm/early": float(result.early),
                }
            )
            self._nm_next()

    def _nm_score_eval_split(self) -> tuple[float, list[float]]:
        """Generate on every eval_split prompt (the first ``nm_eval_samples``) with the current policy (TRL's eval
        dataloader and generation, ``num_generations_eval`` completions per prompt) and return (mean nm_eval_function
        score, mean of each component reward) over all of them and all ranks. TRL's eval metrics and completions-table
        entries of these generations are discarded, so a later ``evaluate()`` and the table are unaffected."""
        saved_metrics, saved_logs = self._metrics["eval"], copy.deepcopy(self._logs)
        self._metrics["eval"] = defaultdict(list)
        was_training = self.model.training
        scores, components = [], []
        self._nm_scoring = True
        self.model.eval()
        try:
            dataset = self.eval_dataset
            if self.args.nm_eval_samples is not None and len(dataset) > self.args.nm_eval_samples:
                dataset = dataset.select(range(self.args.nm_eval_samples))
            for batch in self.get_eval_dataloader(dataset):
                with torch.no_grad():
                    self._generate_and_score_completions(batch)
                scores.append(self._nm_scores.double().cpu())
                components.append(self._component_rewards.double().cpu())
        finally:
            self._nm_scoring = False
            self.model.train(was_training)
            self._metrics["eval"], self._logs = saved_metrics, saved_logs
        return torch.cat(scores).nanmean().item(), torch.cat(components).nanmean(0).tolist()

    # ------------------------------------------------------------------------------------------- state

    def method_state(self) -> dict:
        """Multipliers, their SGD momentum, thresholds and the NM search (``method_state.MethodStateMixin``)."""
        state = {
            "thresholds": list(self.thresholds),
            "multipliers": None if self.multipliers is None else self.multipliers.state_dict(),
        }
        if self.nm is not None:
            state["nm"] = self.nm.state_dict()
            state["nm_iterations"] = None if self.nm_run is None else self.nm_run.iterations
            state["nm_window"] = [list(w) for w in self._nm_window]
        return state

    def load_method_state(self, state: dict) -> None:
        if self.multipliers is not None:
            self.multipliers.load_state_dict(state["multipliers"])
        if self.nm is not None:
            self.nm.load_state_dict(state["nm"])
            self._nm_next()
            if self.nm_run is not None:
                self.nm_run.iterations = state["nm_iterations"]
            self._nm_window = [(float(s), list(v)) for s, v in state["nm_window"]]
        self.thresholds = [float(t) for t in state["thresholds"]]


class ConstrainedRLHFTrainer(_ConstrainedMixin, RLOOTrainer):
    """RLOOTrainer with constrained-RLHF advantages and Lagrange multipliers (the practical TRL variant)."""

    _stream_baseline = staticmethod(rloo_advantages)


class ConstrainedGRPOTrainer(_ConstrainedMixin, GRPOTrainer):
    """GRPOTrainer twin: each stream's advantage is GRPO's group-centred reward (scaled as ``scale_rewards``)."""

    def _stream_baseline(self, rewards, num_generations):
        return group_mean_advantages(rewards, num_generations, self.args.scale_rewards)

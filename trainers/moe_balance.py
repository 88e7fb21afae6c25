"""ALF-LB: auxiliary-loss-free load balancing of mixture-of-experts routers (arXiv 2408.15664, 2512.03915).

Papers: Wang, Gao, Zhao, Sun, Dai, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv 2408.15664 (the method, as used by DeepSeek-V3, arXiv 2412.19437); Han & Zhong, "A Theoretical Framework
for Auxiliary-Loss-Free Load Balancing of Sparse Mixture-of-Experts in Large-Scale AI Models", arXiv 2512.03915
(the primal-dual view and the decaying step size). Only the abstracts and secondary descriptions of the two papers
were read, not their text. No official training code exists for either paper; DeepSeek-V3's ``inference/model.py``
``Gate.forward`` (deepseek-ai/DeepSeek-V3 at 1ea5a1a7ed7429e25ba2fa2c76fe74fa5968d348) is the reference for routing.

Delta from the parent trainer: not a loss. Every MoE router keeps a per-expert bias b (fp32 buffer, no grad,
in the state dict) that is added to the affinities for top-k *selection only*; after each optimizer step a
callback (``MoEBalanceCallback``) moves b towards balance from the step's expert loads. The model's loss and
its gradients are those of the parent (with b = 0 and rate 0 the run is the parent's, bit for bit).

Equations, for one MoE layer with E experts, top-K routing and T tokens in the step (all micro-batches, all
data-parallel ranks):

    s_{t,i} = sigmoid(u_t . e_i)                                      affinities (softmax for Qwen/Mixtral)
    selection:  TopK_i (s_{t,i} + b_i)   (group-limited: keep the topk_group groups with the largest sum of
                                          their top-2 biased scores, DeepSeek-V3 / transformers)
    gate:       g_{t,i} = s_{t,i} / sum_{j selected} s_{t,j} * scaling    if i selected, else 0   (unbiased s)
    loads:      c_i = #{t : i selected for t},   c_bar = K T / E,   e_i = c_bar - c_i
    sign        b_i <- b_i + u sign(e_i)                              DeepSeek, u = 1e-3
    proportional b_i <- b_i + u e_i / c_bar                           load fraction, dimensionless (see Doubts)
    decaying    b_i <- b_i + u (1 + n / n0)^(-p) e_i / c_bar          primal-dual subgradient step, n = 0, 1, ...
    MaxVio      = (max_i c_i - c_bar) / c_bar
    load entropy = -sum_i (c_i / KT) log(c_i / KT)                    (max log E at perfect balance)

Han & Zhong read the bias as the dual variable p of the assignment LP (experts' capacity constraints
sum_t x_{t,i} = c_bar): selection is the primal step, and the update p_i <- p_i + eps_n (c_bar - A_i) a dual
subgradient step; DeepSeek's sign rule is eps_{n,i} = u / |c_bar - A_i|. The "decaying" rule is the plain
subgradient step with eps_n = u (1 + n/n0)^(-p) on the load fraction.

Doubts (what rests on secondary sources or is a choice made here, not read in the papers):
  * proportional/decaying normalise e_i by c_bar (a choice made here: u (L - A) / L, dimensionless). Wang et al.'s
    ablation variant "b_i += u e_i" (as secondary sources report it) may use raw counts or fractions; raw counts
    would make u depend on batch size.
  * The decaying schedule (power p = 0.5 default, n0 = 1) is illustrative: the paper's O(log N) regret needs
    "certain step-size choices", 1/(mu n) being standard for strongly convex objectives (p = 1; not checked against
    the paper).
  * Group score: the sum of the top-2 *biased* scores in each group, as transformers 5.24 and DeepSeek-V3's
    code with a bias; DeepSeek's code without a bias uses the group max instead (``Gate.forward``).
  * Pad tokens: the router sees them. ``RoutingCounter`` drops them from the loads when the forward has a 2-D
    attention mask matching the router's tokens (``ignore_padding=True``); the papers pre-train without pads.
  * ``aux_balance_loss`` (the aux-loss baseline, alpha = 1e-3, in ``trainers/moe_aux_loss.py``) uses the
    normalised affinities s_{t,i} / sum_j s_{t,j} in P_i, as DeepSeek-V3's sequence-wise loss; Wang et al.'s exact
    P_i for sigmoid gates was not read. It is batch-wise (f and P over all tokens of the micro-batch, as Qwen-MoE /
    Mixtral's own loss); DeepSeek-V3's is sequence-wise (per sequence, then averaged): ``moe_aux_loss_scope`` picks
    one (default batch), ``sequence_aux_balance_loss`` is the latter.

Models: DeepSeek-V3 in transformers 5.24 already routes this way: ``DeepseekV3TopkRouter`` registers
``e_score_correction_bias`` as a buffer (modeling_deepseek_v3.py L131), chooses with ``scores + bias``
(L136-152, group-limited) and gathers the weights from the unbiased ``scores`` (L153-157); the buffer and
``gate.weight`` are in ``_keep_in_fp32_modules_strict`` (L551). Qwen2-MoE, Qwen3-MoE and Mixtral routers have no
bias: ``install_expert_bias`` adds the same buffer to each router and swaps its ``forward`` for a selection-only
biased one (documented at the function). Their affinities are softmax probabilities, not sigmoid scores: the bias
and its rate were designed for sigmoid (Wang et al., DeepSeek-V3) and Megatron-LM refuses an expert bias on softmax,
so ``MoEBalanceCallback`` and the recipe check refuse a non-zero rate there unless ``moe_bias_on_softmax`` is set
(``softmax_bias_refusal``: why, and the rate to use, about 4e-3 / E). Biases are buffers, hence in
``model.state_dict()`` and in
``save_pretrained`` / Trainer checkpoints; they are also ``MoEBalanceCallback``'s method state
(``method_state.MethodStateMixin``), which restores them on ``resume_from_checkpoint`` under every backend and for
every router (tested); nothing else of the method carries state (loads are zeroed every step; the decaying step
reads ``state.global_step``).

Gradient checkpointing re-runs each layer's forward during backward; ``RoutingCounter`` counts a router call only
outside the autograd engine (``torch._C._current_graph_task_id() == -1``), so each token is counted once
(a forward hook alone counted every token twice under checkpointing; tested with reentrant and non-reentrant
checkpointing).

Wiring: any LLM recipe takes ``moe_balance: none|aux_free|aux_loss`` and the other ``MoEBalanceConfig`` fields
(``posttrain.recipes.moe``: parsing, the checks before the model loads, ``attach_moe`` after the trainer is built and
before ``train()`` wraps the model). ``aux_loss`` uses the model's own balance loss where it has one (Qwen-MoE,
Mixtral, via TRL's ``router_aux_loss_coef``) and ``RouterAuxLoss`` (an autograd hook adding ``aux_balance_loss``)
where it has none (DeepSeek-V3, GLM-4-MoE). Distributed: the loads of every micro-batch are summed, all-reduced
over the data-parallel ranks and applied after ``optimizer.step()``; every rank holds bit-identical biases under
DDP, ZeRO-2 and ZeRO-3 (buffers are not partitioned; DeepSpeed 0.19.8 keeps fp32 buffers fp32 under bf16), they
land in every checkpoint's ``model.safetensors`` and resume bit for bit (tests/test_moe_distributed.py).
``posttrain.evals.moe_load.maxvio_global`` measures MaxVio_global on an evaluation set (the eval harness's task).
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from posttrain.trainers.moe_aux_loss import AUX_LOSS_SCOPES, RouterAuxLoss
from posttrain.trainers.moe_routers import (
    BIAS_NAME,
    SOFTMAX_ROUTERS,
    RoutingCounter,
    all_reduce_counts,
    checkpoint_to_runtime_names,
    expert_biases,
    find_routers,
    load_expert_biases,
    router_num_experts,
    saved_biases,
)

MOE_BALANCE_MODES = ("none", "aux_free", "aux_loss")
BIAS_RULES = ("sign", "proportional", "decaying")


def softmax_bias_refusal(model_desc: str, num_experts: int | None, rate: float) -> str:
    """The one-line refusal of aux-free balancing with a non-zero rate on a softmax router (Qwen2-MoE, Qwen3-MoE,
    Mixtral) without ``moe_bias_on_softmax: true``.

    Why refuse by default: the selection-only bias of Wang et al. (arXiv 2408.15664) and DeepSeek-V3 (arXiv
    2412.19437) is added to sigmoid affinities, and its rate u = 1e-3 was tuned for them; Megatron-LM's
    ``TransformerConfig.__post_init__`` (megatron/core/transformer/transformer_config.py) raises "Expert bias for
    aux-loss-free routing only supports sigmoid score function" for ``moe_router_enable_expert_bias`` with softmax.
    Softmax probabilities average 1/E instead of about 0.5, so a bias of 1e-3 per step is relatively E/4 times larger
    (a bias u is a logit step of about u / 0.25 on a sigmoid score near 0.5 and u / p on a softmax probability p).
    """
    hint = (
        f"about 4e-3/E = {4e-3 / num_experts:.1e} for its {num_experts} experts"
        if num_experts
        else "about 4e-3/E for E experts"
    )
    return (
        f"moe_balance: aux_free with moe_bias_rate={rate:g} on {model_desc}, a softmax router: the expert bias is "
        "designed and its rate 1e-3 tuned for sigmoid scores (DeepSeek-V3; Megatron-LM refuses an expert bias on "
        f"softmax scores); set `moe_bias_on_softmax: true` to allow it, with a rate scaled to softmax ({hint}), "
        "or use moe_bias_rate: 0 (frozen zero bias: stock routing), moe_balance: aux_loss or none"
    )


@dataclass
class MoEBalanceConfig:
    """Load-balancing settings of an MoE run. Plain dataclass: a trainer config mixes it in (fields ``moe_*``)."""

    moe_balance: str = field(
        default="aux_free",
        metadata={
            "help": "aux_free (ALF-LB: selection-only expert bias updated after each step), aux_loss "
            "(the classic balance loss, alpha = moe_aux_loss_coef; biases frozen) or none (loads are "
            "still measured and logged)."
        },
    )
    moe_bias_rate: float = field(
        default=1e-3,
        metadata={
            "help": "bias update rate u (DeepSeek-V3 / Wang et al.: 1e-3; 1e-4 converges slowly, 1e-2 "
            "oscillates). 0 freezes the biases (the usual choice for DPO/GRPO of a pretrained MoE)."
        },
    )
    moe_bias_rule: str = field(
        default="sign",
        metadata={
            "help": "sign: b += u sign(c_bar - c) (DeepSeek); proportional: b += u (c_bar - c) / c_bar; "
            "decaying: proportional with step u (1 + n / n0)^-p (primal-dual subgradient step, Han & Zhong)."
        },
    )
    moe_bias_on_softmax: bool = field(
        default=False,
        metadata={
            "help": "allow aux_free (with moe_bias_rate > 0) on a softmax router (Qwen2-MoE, Qwen3-MoE, Mixtral). "
            "The selection-only bias was designed and its rate 1e-3 tuned for sigmoid affinities (Wang et al., "
            "DeepSeek-V3); Megatron-LM refuses an expert bias on softmax scores. Softmax probabilities average "
            "1/E, so scale the rate down: u of about 4e-3 / E (a bias u moves a sigmoid score near 0.5 by the "
            "same logit step as a softmax probability near 1/E when u_softmax = u_sigmoid * 4 / E; a heuristic, "
            "untuned) and watch moe/maxvio."
        },
    )
    moe_bias_decay_power: float = field(
        default=0.5,
        metadata={
            "help": "p of the decaying rule's step u (1 + n / n0)^-p (0.5: subgradient default; 1: the "
            "strongly convex choice)."
        },
    )
    moe_bias_decay_steps: float = field(
        default=1.0,
        metadata={"help": "n0 of the decaying rule: number of updates over which the step falls to u / 2^p."},
    )
    moe_aux_loss_coef: float = field(
        default=1e-3,
        metadata={"help": "alpha of the auxiliary balance loss (moe_balance=aux_loss; Wang et al.'s baseline 1e-3)."},
    )
    moe_aux_loss_scope: str = field(
        default="batch",
        metadata={
            "help": "over which tokens the aux loss counts f_i and averages P_i (moe_balance=aux_loss). batch "
            "(default, as before): all tokens of the micro-batch, the classic Switch/GShard form that Qwen-MoE's "
            "and Mixtral's own load_balancing_loss_func compute. sequence: per sequence (batch row), then "
            "averaged over the rows: DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437 "
            "eqs. 17-20, alpha 1e-4 there); computed by posttrain's router hook for every model."
        },
    )
    moe_ignore_padding: bool = field(
        default=True,
        metadata={"help": "leave pad tokens (attention_mask == 0) out of the expert loads."},
    )
    moe_log_per_layer: bool = field(
        default=True,
        metadata={"help": "log MaxVio, load entropy and bias norm per MoE layer as well as overall."},
    )

    def __post_init__(self):
        if self.moe_balance not in MOE_BALANCE_MODES:
            raise ValueError(f"moe_balance={self.moe_balance!r}; valid: {', '.join(MOE_BALANCE_MODES)}")
        if self.moe_aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"moe_aux_loss_scope={self.moe_aux_loss_scope!r}; valid: {', '.join(AUX_LOSS_SCOPES)}")
        if self.moe_bias_rule not in BIAS_RULES:
            raise ValueError(f"moe_bias_rule={self.moe_bias_rule!r}; valid: {', '.join(BIAS_RULES)}")
        if not (math.isfinite(self.moe_bias_rate) and self.moe_bias_rate >= 0):
            raise ValueError(f"moe_bias_rate must be finite and >= 0 (got {self.moe_bias_rate})")
        if not (math.isfinite(self.moe_bias_decay_power) and self.moe_bias_decay_power >= 0):
            raise ValueError(f"moe_bias_decay_power must be finite and >= 0 (got {self.moe_bias_decay_power})")
        if not (math.isfinite(self.moe_bias_decay_steps) and self.moe_bias_decay_steps > 0):
            raise ValueError(f"moe_bias_decay_steps must be finite and > 0 (got {self.moe_bias_decay_steps})")
        if not (math.isfinite(self.moe_aux_loss_coef) and self.moe_aux_loss_coef >= 0):
            raise ValueError(f"moe_aux_loss_coef must be finite and >= 0 (got {self.moe_aux_loss_coef})")


# ----------------------------------------------------------------------------------------------- pure math


def biased_topk(
    scores: Tensor,
    bias: Tensor,
    k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Top-k expert selection on ``scores + bias``; gate weights from the unbiased ``scores``.

    scores (N, E) affinities (sigmoid or softmax; leading dims beyond one are flattened back), bias (E,).
    Group-limited routing (DeepSeek-V3) when n_group > 1: the E experts form n_group consecutive groups, each
    scored by the sum of its top-2 biased scores (its max when a group has one expert), and only the topk_group
    best groups are eligible. Returns ``(indices (N, k) long, weights (N, k))``: indices sorted by decreasing
    biased score; weights = scores gathered at indices, divided by their sum (+1e-20, as transformers) when
    norm_topk_prob, times scaling. Weights carry the scores' gradient; the bias never gets one.
    """
    E = scores.shape[-1]
    if bias.shape != (E,):
        raise ValueError(f"bias must have shape ({E},), got {tuple(bias.shape)}")
    if E % n_group:
        raise ValueError(f"{E} experts do not split into n_group={n_group} groups")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= k <= topk_group * (E // n_group):
        raise ValueError(f"k={k} must be in [1, {topk_group * (E // n_group)}] (experts in the chosen groups)")
    lead = scores.shape[:-1]
    s = scores.reshape(-1, E)
    with torch.no_grad():  # selection is discrete: no gradient flows through it
        choice = s.detach().float() + bias.detach().float().to(s.device)
        if n_group > 1:
            size = E // n_group
            grouped = choice.view(-1, n_group, size)
            group_scores = grouped.topk(min(2, size), dim=-1)[0].sum(dim=-1)  # (N, n_group)
            group_idx = group_scores.topk(topk_group, dim=-1)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = choice.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
        indices = choice.topk(k, dim=-1, sorted=True)[1]
    weights = s.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    return indices.view(*lead, k), weights.view(*lead, k)


def bias_step_size(rate: float, n: int, decay_power: float = 0.5, decay_steps: float = 1.0) -> float:
    """Step of the decaying rule at update n (0-based): rate (1 + n / decay_steps)^-decay_power."""
    return rate * (1.0 + n / decay_steps) ** (-decay_power)


def update_expert_bias(
    bias: Tensor,
    counts: Tensor,
    rate: float,
    rule: str = "sign",
    *,
    step: int = 0,
    decay_power: float = 0.5,
    decay_steps: float = 1.0,
) -> Tensor:
    """One balancing step of the expert bias from the loads of the step (pure: returns a new tensor).

    bias (..., E), counts (..., E) (token counts, any dtype; leading dims are independent layers).
    e = c_bar - counts with c_bar the mean load (K T / E). Rules: ``sign`` b + rate sign(e) (sign(0) = 0, so a
    balanced expert stays); ``proportional`` b + rate e / c_bar; ``decaying`` b + bias_step_size(rate, step,
    decay_power, decay_steps) e / c_bar. A layer with no tokens (c_bar = 0) is left unchanged. The result has the
    bias's dtype (keep it fp32: a 1e-3 step is lost next to a bias of 0.5 in bf16).
    """
    if rule not in BIAS_RULES:
        raise ValueError(f"rule={rule!r}; valid: {', '.join(BIAS_RULES)}")
    if counts.shape != bias.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and bias {tuple(bias.shape)} differ in shape")
    if rate == 0:
        return bias.clone()
    c = counts.to(device=bias.device, dtype=torch.float64)
    mean = c.mean(dim=-1, keepdim=True)
    err = mean - c
    if rule == "sign":
        delta = rate * torch.sign(err)
    else:
        step_size = rate if rule == "proportional" else bias_step_size(rate, step, decay_power, decay_steps)
        delta = step_size * torch.where(mean > 0, err / mean.clamp_min(1e-12), torch.zeros_like(err))
    return bias + delta.to(bias.dtype)


def _maxvio_rows(c):
    """(L,) MaxVio of each row of float64 loads (L, E); 0 for a row without tokens."""
    mean = c.mean(dim=-1)
    return torch.where(mean > 0, (c.max(dim=-1).values - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


def _entropy_rows(c):
    """(L,) entropy (nats) of each row's load distribution of float64 loads (L, E); 0 for a row without tokens."""
    total = c.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, c / total.clamp_min(1e-12), torch.zeros_like(c))
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(dim=-1)


def max_violation(counts: Tensor) -> float:
    """MaxVio = (max_i c_i - c_bar) / c_bar of loads (E,); of (L, E), the mean over the L layers. 0 if no tokens."""
    c = counts.detach().double()
    return float(_maxvio_rows(c.reshape(-1, c.shape[-1])).mean())


def load_entropy(counts: Tensor, normalized: bool = False) -> float:
    """Entropy (nats) of the load distribution c / sum c over experts (E,); of (L, E), the mean over layers.

    log E at perfect balance, 0 when one expert takes every token; ``normalized`` divides by log E. 0 if no tokens.
    """
    c = counts.detach().double()
    c = c.reshape(-1, c.shape[-1])
    h = _entropy_rows(c)
    if normalized:
        h = h / math.log(c.shape[-1]) if c.shape[-1] > 1 else torch.zeros_like(h)
    return float(h.mean())


def moe_metrics(
    counts: Tensor | Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
    per_layer: bool = True,
    prefix: str = "moe/",
) -> dict[str, float]:
    """Metrics of one step: per layer (``{prefix}{name}/maxvio|load_entropy|bias_norm``) and overall.

    counts (L, E) or a list of (E,); biases a matching list (or None); names the layer labels (default 0..L-1).
    Overall: ``maxvio`` (mean over layers, the paper's MaxVio_batch), ``maxvio_max`` (worst layer),
    ``load_entropy`` (mean over layers, nats), ``bias_norm`` (L2 over all layers' biases), ``assignments``
    (token-expert assignments per layer, mean over layers: tokens x K when each token is counted once).
    Layers with the same number of experts are computed together, with one device-to-host copy.
    """
    rows = [c.detach() for c in counts]
    names = list(names) if names is not None else [str(i) for i in range(len(rows))]
    out = {}
    if not rows:
        return out
    # layers with as many experts as the first go in one (L, E) matrix: one device-to-host copy, vectorised rows
    if all(r.shape == rows[0].shape for r in rows):
        mats = [torch.stack([r.to(rows[0].device) for r in rows]).reshape(len(rows), -1).double().cpu()]
    else:
        mats = [r.reshape(1, -1).double().cpu() for r in rows]
    vios = torch.cat([_maxvio_rows(m) for m in mats]).tolist()
    ents = torch.cat([_entropy_rows(m) for m in mats]).tolist()
    sums = torch.cat([m.sum(dim=-1) for m in mats]).tolist()
    norms = None
    if biases is not None and len(biases):
        b = [x.detach().reshape(-1) for x in biases]
        if all(x.shape == b[0].shape for x in b):
            norms = torch.stack([x.to(b[0].device) for x in b]).double().cpu().norm(dim=-1).tolist()
        else:
            norms = [float(x.double().norm()) for x in b]
    if per_layer:
        for i, name in enumerate(names):
            out[f"{prefix}{name}/maxvio"] = vios[i]
            out[f"{prefix}{name}/load_entropy"] = ents[i]
            if norms is not None:
                out[f"{prefix}{name}/bias_norm"] = norms[i]
    out[f"{prefix}maxvio"] = sum(vios) / len(vios)
    out[f"{prefix}maxvio_max"] = max(vios)
    out[f"{prefix}load_entropy"] = sum(ents) / len(ents)
    out[f"{prefix}assignments"] = sum(sums) / len(sums)
    if norms is not None:
        out[f"{prefix}bias_norm"] = math.sqrt(sum(n * n for n in norms))
    return out


# ----------------------------------------------------------------------------------------------- model side


def _softmax_router_forward(self, hidden_states):
    """Selection-only biased forward for Qwen2-MoE / Qwen3-MoE / Mixtral routers (installed by install_expert_bias).

    Same as transformers 5.24's ``Qwen3MoeTopKRouter.forward`` (modeling_qwen3_moe.py L259-268; Qwen2-MoE L320-329,
    Mixtral L104-111) with the top-k taken on softmax + bias: logits = h W^T, probs = softmax(logits) in fp32,
    indices = TopK(probs + bias), weights = probs at the indices, renormalised if ``norm_topk_prob`` (Mixtral
    always). With a zero bias the outputs equal the original's.
    """
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
    indices, weights = biased_topk(
        probs, getattr(self, BIAS_NAME), self.top_k, norm_topk_prob=getattr(self, "norm_topk_prob", True)
    )
    if self._posttrain_cast_weights:
        weights = weights.to(router_logits.dtype)
    return router_logits, weights, indices


def install_expert_bias(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Give every router of ``model`` a selection-only expert bias; returns the routers ``[(name, module)]``.

    DeepSeek-V3-style routers (an ``e_score_correction_bias`` buffer already routing selection-only) are left as
    they are. Qwen2-MoE, Qwen3-MoE and Mixtral routers (``SOFTMAX_ROUTERS``) get a zero fp32 buffer
    ``e_score_correction_bias`` (E,) and an instance-level ``forward`` (``_softmax_router_forward``): selection on
    softmax + bias, weights from the unbiased softmax. The patch is per instance (the class is untouched), so
    apply it after loading the model and before training. The buffer then sits in the state dict; a checkpoint
    saved from a patched model carries ``...gate.e_score_correction_bias`` keys, which a fresh ``from_pretrained``
    reports as unexpected and drops: patch the new model and call ``load_expert_biases(model, folder)``.
    Their models' ``output_router_logits`` aux loss (``load_balancing_loss_func``) recomputes an *unbiased*
    top-k from the logits: keep ``router_aux_loss_coef = 0`` with aux-free balancing. Other routers raise
    NotImplementedError.
    """
    routers = find_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router (no *TopkRouter module)")
    for name, mod in routers:
        if isinstance(mod._buffers.get(BIAS_NAME), torch.Tensor):
            continue
        cls = type(mod).__name__
        if cls not in SOFTMAX_ROUTERS:
            raise NotImplementedError(
                f"no selection-only bias patch for router {cls} ({name}); "
                f"supported: {', '.join(SOFTMAX_ROUTERS)} and routers with {BIAS_NAME}"
            )
        mod.register_buffer(
            BIAS_NAME, torch.zeros(router_num_experts(mod), dtype=torch.float32, device=mod.weight.device)
        )
        mod._posttrain_cast_weights = cls != "MixtralTopKRouter"  # Qwen casts weights to the logits' dtype
        mod.forward = types.MethodType(_softmax_router_forward, mod)
    return routers


def restore_expert_biases(model: nn.Module, folder: str | os.PathLike) -> int:
    """For a model fresh from ``from_pretrained(folder)``: if ``folder`` was saved from patched routers (Qwen /
    Mixtral, ``install_expert_bias``), whose biases the stock class dropped, patch the routers and load the saved
    biases. Returns the number of biases loaded (0 when the folder holds none that the model lacks)."""
    saved = saved_biases(folder)
    if not saved:
        return 0
    runtime_name, own = checkpoint_to_runtime_names(model), model.state_dict()
    if all(runtime_name(k) in own for k in saved):  # e.g. DeepSeek-V3: loaded with the model
        return 0
    install_expert_bias(model)
    return load_expert_biases(model, folder)


def apply_bias_update(
    model_or_counter: nn.Module | RoutingCounter,
    counts: Tensor | None = None,
    rate: float = 1e-3,
    rule: str = "sign",
    *,
    step: int = 0,
    decay_power: float = 0.5,
    decay_steps: float = 1.0,
    reduce: bool = True,
) -> Tensor:
    """All-reduce the step's loads and update every router's bias in place (fp32, no grad); returns the loads.

    ``model_or_counter``: a ``RoutingCounter`` (its routers and, when ``counts`` is None, its counts) or a model
    (then ``counts`` is required: a list of (E,) or an (L, E) tensor in router order). The loads are summed across
    data-parallel ranks when torch.distributed is initialised (``reduce``), so every rank applies the same update
    (DDP also re-broadcasts buffers from rank 0 at each forward). A bias that is not fp32 (a model cast to bf16)
    is replaced by its fp32 copy. Returns the reduced loads as a list of (E,) tensors.
    """
    if isinstance(model_or_counter, RoutingCounter):
        routers = model_or_counter.routers
        counts = model_or_counter.counts if counts is None else counts
    else:
        routers = find_routers(model_or_counter)
        if counts is None:
            raise ValueError("counts are required when a model is given")
    counts = list(counts)
    if len(counts) != len(routers):
        raise ValueError(f"{len(counts)} count rows for {len(routers)} routers")
    biases = expert_biases(routers) if rate != 0 else None  # rate 0 (none / aux_loss): loads only, biases optional
    counts = all_reduce_counts(counts) if reduce else [c.clone() for c in counts]
    if rate == 0:
        return counts
    kw = dict(step=step, decay_power=decay_power, decay_steps=decay_steps)
    with torch.no_grad():
        if all(b.shape == biases[0].shape and b.device == biases[0].device for b in biases):
            # every layer in one update (rows are independent; the same numbers as layer by layer)
            stacked = update_expert_bias(
                torch.stack([b.float() for b in biases]),
                torch.stack([c.to(biases[0].device) for c in counts]),
                rate,
                rule,
                **kw,
            )
            news = stacked.unbind(0)
        else:
            news = [update_expert_bias(b.float(), c.to(b.device), rate, rule, **kw) for b, c in zip(biases, counts)]
        for (_, mod), b, new in zip(routers, biases, news):
            if b.dtype == torch.float32:
                b.copy_(new)
            else:
                setattr(mod, BIAS_NAME, new.clone())  # assigning to a registered buffer name replaces the buffer
    return counts


class MoEBalanceCallback(TrainerCallback):
    """Aux-loss-free balancing inside ``transformers.Trainer`` / TRL trainers.

    on_train_begin: hook the routers (``RoutingCounter``; the constructor does it at once when given ``model``).
    on_step_begin (first micro-batch of each optimizer step): zero the loads. on_step_end (after
    ``optimizer.step()``): all-reduce the loads, update the biases (``moe_balance="aux_free"``; otherwise rate 0:
    loads only) and record the metrics (``moe_metrics`` of the reduced loads and the new biases). The metrics reach
    the logs through TRL's ``trainer._metrics`` when a trainer is attached (``attach``) and has one (averaged over the
    logging window like TRL's own); else on_log adds the last step's metrics (once) to the next training log and to
    its ``state.log_history`` entry (``attach`` puts the callback first so the reporters see them). The biases are
    model buffers and the callback's method state: every checkpoint carries them and a resume restores them; the
    decaying step is computed from ``state.global_step``, so a resumed run continues the schedule.

    ``count_no_grad=False`` leaves forwards under no_grad out of the loads (generation, old/reference log-probs of
    RL and preference trainers; needs non-reentrant gradient checkpointing, see ``RoutingCounter``).
    ``aux_loss_hook=True`` with ``moe_balance="aux_loss"`` adds posttrain's ``RouterAuxLoss`` (for models without
    an aux loss of their own, and for ``moe_aux_loss_scope: sequence`` on any model); its value is logged as
    ``moe/aux_loss``.
    """

    def __init__(
        self, config: MoEBalanceConfig | None = None, model=None, trainer=None, count_no_grad=True, aux_loss_hook=False
    ):
        self.config = config or MoEBalanceConfig()
        self.counter = None
        self.routers = None
        self.aux = None
        self.trainer = None
        self.count_no_grad = count_no_grad
        self.aux_loss_hook = aux_loss_hook
        self.last_metrics: dict[str, float] = {}
        self.last_counts: list = []
        self._pending: dict[str, float] = {}
        self.history: list[dict] = []
        if model is not None:
            self._setup(model)
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer):
        """Register with ``trainer`` (first in its callback list) and route metrics to its ``_metrics`` if any."""
        self.trainer = trainer
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        cbs.insert(0, self)
        return self

    def _setup(self, model):
        if self.counter is not None:
            return
        cfg = self.config
        if cfg.moe_balance == "aux_free":
            if cfg.moe_bias_rate > 0 and not cfg.moe_bias_on_softmax:
                softmax = [
                    m
                    for _, m in find_routers(model)
                    if type(m).__name__ in SOFTMAX_ROUTERS and not isinstance(m._buffers.get(BIAS_NAME), torch.Tensor)
                ]
                if softmax:
                    raise ValueError(
                        softmax_bias_refusal(
                            f"{type(model).__name__} ({type(softmax[0]).__name__})",
                            router_num_experts(softmax[0]),
                            cfg.moe_bias_rate,
                        )
                    )
            install_expert_bias(model)  # no-op for DeepSeek-V3-style routers
        self.counter = RoutingCounter(
            model, ignore_padding=self.config.moe_ignore_padding, count_no_grad=self.count_no_grad
        )
        self.routers = self.counter.routers  # kept after on_train_end removes the hooks: the final save reads them
        if self.config.moe_balance == "aux_loss" and self.aux_loss_hook:
            self.aux = RouterAuxLoss(
                self.counter.routers,
                alpha=self.config.moe_aux_loss_coef,
                scale_fn=self._aux_scale,
                mask_source=self.counter if self.config.moe_ignore_padding else None,
                scope=self.config.moe_aux_loss_scope,
                model=model,
            )

    def _aux_scale(self):
        """Backward scale of the aux loss: 1 / gradient-accumulation steps, as the trainer scales its own loss."""
        trainer = self.trainer
        steps = getattr(trainer, "current_gradient_accumulation_steps", None) if trainer is not None else None
        if not steps and trainer is not None:
            steps = trainer.args.gradient_accumulation_steps
        return 1.0 / (steps or 1)

    @property
    def rate(self):
        return self.config.moe_bias_rate if self.config.moe_balance == "aux_free" else 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._setup(model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.counter is not None:
            self.counter.reset()
        if self.aux is not None:
            self.aux.reset()

    def on_step_end(self, args, state, control, **kwargs):
        if self.counter is None:
            return
        cfg = self.config
        counts = apply_bias_update(
            self.counter,
            rate=self.rate,
            rule=cfg.moe_bias_rule,
            step=max(state.global_step - 1, 0),
            decay_power=cfg.moe_bias_decay_power,
            decay_steps=cfg.moe_bias_decay_steps,
        )
        biases = expert_biases(self.routers) if self._has_biases() else None
        metrics = moe_metrics(counts, biases, self.counter.names, per_layer=cfg.moe_log_per_layer)
        if self.aux is not None:
            metrics["moe/aux_loss"] = self.aux.mean()
        self.last_metrics = metrics
        self.last_counts = counts  # the step's loads (list of (E,)), summed over micro-batches and ranks
        self.history.append({"step": state.global_step, **metrics})
        sink = getattr(self.trainer, "_metrics", None)
        if isinstance(sink, dict) and "train" in sink:  # TRL: averaged over the logging window, logged by it
            for k, v in metrics.items():
                sink["train"][k].append(v)
        else:
            self._pending = metrics

    def _has_biases(self):
        return all(isinstance(m._buffers.get(BIAS_NAME), torch.Tensor) for _, m in self.routers)

    # method state (method_state.MethodStateMixin): the biases under the model's runtime names, so a resume restores
    # them whatever names the model's checkpoint layout gives them (Mixtral's are renamed on save) and on every backend

    @property
    def has_method_state(self):  # aux_free only: otherwise the biases (DeepSeek-V3's own) never move
        return self.config.moe_balance == "aux_free" and self.routers is not None

    def method_state(self):
        return {
            "expert_biases": {
                name: b.detach().to("cpu", torch.float32).clone()
                for (name, _), b in zip(self.routers, expert_biases(self.routers))
            }
        }

    def load_method_state(self, state):
        saved = state["expert_biases"]
        names = [name for name, _ in self.routers]
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"the checkpoint's expert biases are for routers {sorted(saved)[:3]}..., this model has "
                f"{names[:3]}...: resume with the model the run started from"
            )
        with torch.no_grad():
            for name, b in zip(names, expert_biases(self.routers)):
                b.copy_(saved[name].to(b.device, b.dtype))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # once, into the first training log after the step (not eval logs, not the end-of-training summary)
        if not self._pending or logs is None or any(k.startswith("eval_") or k == "train_runtime" for k in logs):
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.counter is not None:
            self.counter.remove()
            self.counter = None
        if self.aux is not None:
            self.aux.remove()
            self.aux = None

"""SparsePO: token-level preference optimisation with sparse token masks (arXiv 2410.05102).

Official code: huawei-noah/HEBO, folder SparsePO (Apache-2.0), read at commit 04f4ece8c7ac95d1466763880def692fc2215f6f
(``src/trainers/sparse_trainer.py``: learned masks; ``src/trainers/mapo_trainer.py``: activation masks;
``src/masks/mask_models.py``: the mask networks); this module follows that code, written anew for TRL 1.16. Only
the paper's abstract was read, so the equations below are those of the code.

Delta from TRL's ``DPOTrainer``: ``_compute_loss`` is replaced by the TDPO-1 objective with a token mask on
the reward term and one on the KL term. For a pair (y_w, y_l), over completion tokens t:

    l_t(y)   = log pi(y_t | .) - log pi_ref(y_t | .)                       token log-ratio
    d_t(y)   = sum_v pi_ref(v | .) [log pi(v | .) - log pi_ref(v | .)]     = -KL(pi_ref || pi) <= 0
    U        = sum_t m^u_t(y_w) l_t(y_w) - sum_t m^u_t(y_l) l_t(y_l)
    D        = sum_t m^d_t(y_w) d_t(y_w) - sum_t m^d_t(y_l) d_t(y_l)
    loss     = -log sigmoid(beta (U - D)) + l1_u (|m^u(y_w)|_1 + |m^u(y_l)|_1) + l1_d (|m^d(y_w)|_1 + |m^d(y_l)|_1)

Masks (``mask_type``):
- ``learned`` (official "sparse"): a small network reads the *reference* model's hidden states (no grad)
  and outputs m_t >= 0 (ReLU makes masks exactly sparse). ``simple_all``: one shared LayerNorm, a linear
  unit per layer, a bias-free mixer over layers; ``simple_last``: one linear unit on the last hidden state;
  ``random``: uniform [0, 1) (an ablation). The network is a submodule of the policy (so DDP/DeepSpeed and
  the optimizer see it), trained jointly, with ``mask_weight_decay``; the ``resc`` / ``znorm`` activations
  use their per-row min / max / std as constants in the gradient, as the official code does; kept out of
  ``model.safetensors`` and
  saved as the trainer's method state (``method_state.pt``) in every checkpoint and the final output folder.
- ``activation`` (official "MaPO"): the reference model's activations at the official mlp / attn / resid
  (including the ``delta_attn`` / ``delta_mlp`` block outputs) / logits hook points (``hook_points``: Llama /
  Qwen / Mistral-style decoders, GPT-2, GPT-NeoX, GPT-BigCode; a hook type that finds no point in a model is
  an error naming its class), reduced per token by ``activation_mapping`` (default ``zn_rescale``: the
  feature mean, min-max rescaled per sequence over completion tokens), averaged per type then over the
  types of ``activation_hook`` (``all`` or a comma-separated list); no parameters.
- ``uniform``: all ones, i.e. TDPO-1 (there is no plain-DPO mode: the KL term is always there).

With ``rw_kl_independent=False`` (default, "common") one mask serves both terms; when it is applied to both
(``mask_on_reward`` and ``mask_on_kl``) the trainer halves both L1 coefficients, as the official trainer does
(only then). With ``rw_kl_independent=True`` a network per masked term is built (none for a term whose
``mask_on_*`` is false) and the KL mask is logged as ``kl_mask/*`` beside the reward mask's ``mask/*``. Logged
``rewards/chosen`` is beta (sum m^u l + sum m^d d) of
the chosen rows, as the official trainer logs it: neither DPO's reward nor the loss logit beta (U - D).

Memory: d_t needs full-vocabulary distributions of policy and reference. They are never held for the whole
batch: the policy forward is patched (like TRL's fused LM head) to project completion tokens through both
LM heads in chunks of ``kl_chunk_size`` tokens in a custom autograd function that keeps no logits and
recomputes each chunk's in backward (one ZeRO-3 gather of the heads per pass). Doubts: the official code runs the
heads without chunking (same
numbers); its MaPO normalisation goes through fp16 (we stay in fp32: differences ~1e-4); a 1-token
completion gives NaN there and 1.0 here.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from trl import DPOConfig, DPOTrainer

from posttrain.trainers.activation_hooks import hook_points
from posttrain.trainers.method_state import MethodStateMixin, gathered
from posttrain.trainers.trl_seam import (
    capture_last_hidden_state,
    inner_model,
    maybe_gather_lm_head_ctx,
    reference_model,
)

logger = logging.getLogger(__name__)


@dataclass
class SparsePOConfig(DPOConfig):
    """DPOConfig plus the SparsePO mask settings; defaults are the official ones (SparseConfig / MaPOConfig)."""

    mask_type: str = field(
        default="learned",
        metadata={"help": "learned (official 'sparse'), activation (official 'MaPO') or uniform (TDPO-1)."},
    )
    mask_model: str = field(
        default="simple_all", metadata={"help": "learned masks: simple_all, simple_last or random."}
    )
    mask_layer_activation: str = field(
        default="relu", metadata={"help": "per-layer activation: relu, resc, znorm or none."}
    )
    mask_mixer_activation: str = field(
        default="relu", metadata={"help": "mixer activation: relu, resc, znorm or none."}
    )
    mask_dropout: float = field(
        default=0.01, metadata={"help": "dropout in the mask network (zeroed by disable_dropout=True, the default)."}
    )
    mask_weight_decay: float = field(
        default=0.01, metadata={"help": "weight decay of the mask network's weights (own optimizer group)."}
    )
    mask_on_reward: bool = field(default=True, metadata={"help": "mask the reward term (else m^u = 1)."})
    mask_on_kl: bool = field(default=True, metadata={"help": "mask the KL term (else m^d = 1; the KL term stays)."})
    rw_kl_independent: bool = field(
        default=False,
        metadata={
            "help": (
                "two mask networks (reward, KL) instead of one common mask; only those whose mask_on_* is true are "
                "built; the KL mask is logged as kl_mask/*."
            )
        },
    )
    l1_norm_param_u: float = field(
        default=0.0,
        metadata={
            "help": (
                "L1 penalty on the reward mask (halved when one common mask is on both terms, as the official trainer)."
            )
        },
    )
    l1_norm_param_d: float = field(
        default=0.0,
        metadata={
            "help": "L1 penalty on the KL mask (halved when one common mask is on both terms, as the official trainer)."
        },
    )
    activation_hook: str = field(
        default="all",
        metadata={
            "help": (
                "activation masks: all, or a comma-separated list of mlp, attn, resid, logits (official MAPOConfig)."
            )
        },
    )
    activation_mapping: str = field(
        default="zn_rescale",
        metadata={
            "help": (
                "activation masks, per hook point (official apply_activation_mapping): zn_rescale (feature mean, "
                "z-normalised and min-max rescaled per sequence; the official default), none (feature mean), sigmoid "
                "(feature mean of sigmoid), layernorm (feature mean of layer_norm: ~0)."
            )
        },
    )
    kl_chunk_size: int = field(
        default=512, metadata={"help": "completion tokens projected through the LM heads at once (memory vs speed)."}
    )

    def __post_init__(self):
        super().__post_init__()
        checks = {
            "mask_type": (self.mask_type, MASK_TYPES),
            "mask_model": (self.mask_model, MASK_MODELS),
            "mask_layer_activation": (self.mask_layer_activation, ACTIVATIONS),
            "mask_mixer_activation": (self.mask_mixer_activation, ACTIVATIONS),
            "activation_mapping": (self.activation_mapping, MAPPINGS),
        }
        hooks = [k.strip() for k in self.activation_hook.split(",")]
        if not hooks or any(k not in HOOK_TYPES for k in hooks):
            raise ValueError(
                f"activation_hook={self.activation_hook!r}; valid: all, or a comma-separated list of "
                f"{', '.join(HOOK_TYPES[1:])}"
            )
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ValueError(f"{name}={value!r}; valid: {', '.join(valid)}")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "SparsePO needs the reference model's per-token distributions and hidden states at every step; "
                "precompute_ref_log_probs stores only sequence log-probs: set it to false"
            )
        if list(self.loss_type) != ["sigmoid"]:
            raise ValueError(f"SparsePO implements the sigmoid loss only (loss_type={self.loss_type})")
        if self.kl_chunk_size < 1:
            raise ValueError("kl_chunk_size must be >= 1")


MASK_TYPES = ("learned", "activation", "uniform")
MASK_MODELS = ("simple_all", "simple_last", "random")
ACTIVATIONS = ("relu", "resc", "znorm", "none")
HOOK_TYPES = ("all", "mlp", "attn", "resid", "logits")
MAPPINGS = ("zn_rescale", "none", "sigmoid", "layernorm")


# ----------------------------------------------------------------------------------------------- pure math


def sparsepo_loss(
    logratio: Tensor,
    neg_kl: Tensor,
    reward_mask: Tensor,
    kl_mask: Tensor,
    completion_mask: Tensor,
    beta: float,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
) -> Tensor:
    """Per-pair SparsePO loss (B,). All inputs (2B, T), rows [chosen; rejected]; masks are applied on
    completion tokens only, and the L1 penalty sums each mask over both rows of the pair."""
    cm = completion_mask.to(logratio.dtype)
    mu, md = reward_mask * cm, kl_mask * cm
    u_rows, d_rows = (mu * logratio).sum(-1), (md * neg_kl).sum(-1)
    (u_c, u_r), (d_c, d_r) = u_rows.chunk(2), d_rows.chunk(2)
    loss = -F.logsigmoid(beta * ((u_c - u_r) - (d_c - d_r)))
    penalty = l1_reward * mu.abs().sum(-1) + l1_kl * md.abs().sum(-1)
    return loss + sum(penalty.chunk(2))


def _masked_minmax(x, mask, constant_range=False):
    """Per-row min-max of ``x`` over ``mask`` to [0, 1], 0 outside; a constant row gives 1 on the mask.
    ``constant_range``: min and max enter as constants (no gradient through them), as the official
    ``apply_masked_rescaling`` does (it rebuilds them with ``torch.Tensor(list)``)."""
    mask = mask.bool()
    big = torch.finfo(x.dtype).max
    lo = torch.where(mask, x, big).amin(-1, keepdim=True)
    hi = torch.where(mask, x, -big).amax(-1, keepdim=True)
    if constant_range:
        lo, hi = lo.detach(), hi.detach()
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(x))
    return out * mask


def activation_mask(features: Tensor, completion_mask: Tensor) -> Tensor:
    """MaPO mask from feature-mean activations (N, T): per-sequence min-max over completion tokens, 0 elsewhere."""
    return _masked_minmax(features.float(), completion_mask)


def _znorm(x, mask):
    """Masked z-score per row; the mean is differentiable, the std a constant (official ``apply_masked_z_norm``)."""
    mask = mask.to(x.dtype)
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * mask).sum(-1, keepdim=True) / n
    var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    return (x - mean) / (var.sqrt().detach() + 1e-12)


def _activate(x, name, mask):
    """Mask-network activation. ``resc`` / ``znorm`` treat their per-row statistics (min, max, std) as
    constants, as the official code does: same values, and the gradient of a token's mask value flows only
    through that token (and, for znorm, the row mean)."""
    if name == "relu":
        return F.relu(x)
    if name == "resc":
        return _masked_minmax(x, mask, constant_range=True)
    if name == "znorm":
        return _masked_minmax(_znorm(x, mask), mask, constant_range=True)
    return x


class SimpleMaskAllLayers(nn.Module):
    """m_t = phi_mix(sum_l c_l * phi_layer(w_l . LN(H^l_t) + b_l)), one LayerNorm shared by all layers."""

    def __init__(
        self, num_layers, hidden_size, eps=1e-5, layer_activation="relu", mixer_activation="relu", dropout=0.0
    ):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.layer_weight = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))
        self.mixer_weight = nn.Parameter(torch.zeros(num_layers))
        self.layer_activation, self.mixer_activation = layer_activation, mixer_activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, mask):  # hidden_states: L tensors (N, T, d)
        mixed = 0
        for i, h in enumerate(hidden_states):
            a = self.norm(h.to(self.layer_weight.dtype)) @ self.layer_weight[i] + self.layer_bias[i]
            mixed = mixed + self.mixer_weight[i] * self.dropout(_activate(a, self.layer_activation, mask))
        return self.dropout(_activate(mixed, self.mixer_activation, mask))


class SimpleMaskLastLayer(nn.Module):
    """m_t = phi(w . H^L_t + b) on the last hidden state, no LayerNorm."""

    def __init__(self, hidden_size, activation="relu", dropout=0.0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, mask):
        return self.dropout(
            _activate(self.linear(hidden_states[-1].to(self.linear.weight.dtype)).squeeze(-1), self.activation, mask)
        )


class RandomMask(nn.Module):
    """Uniform [0, 1) per token (ablation); no parameters."""

    def forward(self, hidden_states, mask):
        return torch.rand(mask.shape, device=mask.device)


def build_mask_network(config: SparsePOConfig, model_config: PretrainedConfig) -> nn.Module:
    text = model_config.get_text_config()
    dropout = 0.0 if config.disable_dropout else config.mask_dropout
    if config.mask_model == "random":
        return RandomMask()
    if config.mask_model == "simple_last":
        net = SimpleMaskLastLayer(text.hidden_size, config.mask_mixer_activation, dropout)
    else:
        eps = getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_epsilon", None) or 1e-5
        net = SimpleMaskAllLayers(
            text.num_hidden_layers,
            text.hidden_size,
            eps,
            config.mask_layer_activation,
            config.mask_mixer_activation,
            dropout,
        )
    # What HF's _init_weights gives missing keys: normal(0, initializer_range) weights, zero biases, LN = identity.
    std = getattr(text, "initializer_range", 0.02)
    for name, p in net.named_parameters():
        if name.startswith("norm."):
            continue
        nn.init.normal_(p, 0.0, std) if "weight" in name else nn.init.zeros_(p)
    return net


# ------------------------------------------------------------------------- per-token terms, chunked


def _up(x):
    """At least float32 (bf16/fp16 logits are upcast for the softmax; float64 stays, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logits(hidden, ref_hidden, weight, bias, ref_weight, ref_bias):
    """Policy and reference logits of one chunk, (M, V) each, upcast."""
    return _up(F.linear(hidden, weight, bias)), _up(F.linear(ref_hidden, ref_weight, ref_bias))


def _rowdot(a, b):
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # sum_v a*b per row, without an (M, V) product


class _TokenTerms(torch.autograd.Function):
    """(l_t, -KL_t, mean reference logit) for M tokens, projected ``chunk`` tokens at a time.

    Forward keeps no logits; backward recomputes them chunk by chunk and applies the closed-form gradient
    d/dz [g_l l + g_d d] = g_l onehot(y) + g_d p_ref - (g_l + g_d) p_pol. Only two (chunk, V) buffers are
    alive at once (in-place softmaxes). The heads are used as raw tensors inside one ZeRO-3 gather per pass
    (TRL's ``maybe_gather_lm_head_ctx``), never as module calls per chunk: ranks with different token
    counts would otherwise issue different numbers of collectives.
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, labels, weight, bias, ref_weight, ref_bias, chunk, logit_mapping="none"):
        outs = []
        with maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias):
            for s in range(0, hidden.shape[0], chunk):
                z, rz = _chunk_logits(
                    hidden[s : s + chunk], ref_hidden[s : s + chunk], weight, bias, ref_weight, ref_bias
                )
                lse, rlse = z.logsumexp(-1, keepdim=True), rz.logsumexp(-1, keepdim=True)
                taken = labels[s : s + chunk].unsqueeze(-1)
                logratio = (z.gather(-1, taken) - lse - rz.gather(-1, taken) + rlse).squeeze(-1)
                ref_mean = map_activation(rz, logit_mapping)
                # -KL(p_ref || p) = sum_v p_ref (z - rz) - lse + rlse
                z.sub_(rz)
                p_ref = rz.sub_(rlse).exp_()
                neg_kl = _rowdot(p_ref, z) - lse.squeeze(-1) + rlse.squeeze(-1)
                outs.append((logratio, neg_kl, ref_mean, lse, rlse))
        empty = _up(hidden.new_zeros(0))
        lse, rlse = (torch.cat([o[i] for o in outs]) if outs else empty for i in (3, 4))
        # the log-normalisers are two floats per token: kept, so backward recomputes only the logits (a logsumexp
        # over the vocabulary costs as much as the softmax itself)
        ctx.save_for_backward(hidden, ref_hidden, labels, weight, bias, ref_weight, ref_bias, lse, rlse)
        ctx.chunk = chunk
        return tuple(torch.cat([o[i] for o in outs]) if outs else empty for i in range(3))

    @staticmethod
    def backward(ctx, grad_logratio, grad_neg_kl, _):
        hidden, ref_hidden, labels, weight, bias, ref_weight, ref_bias, all_lse, all_rlse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        d_hidden = torch.zeros_like(hidden) if need_h else None
        with maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias):
            # Inside the gather (as TRL's chunked_logprob): a ZeRO-3 partitioned head has numel 0 outside it.
            d_weight = _up(torch.zeros(weight.shape, dtype=weight.dtype, device=hidden.device)) if need_w else None
            d_bias = _up(torch.zeros(bias.shape, dtype=bias.dtype, device=hidden.device)) if need_b else None
            # The two gradient products run in the activations' dtype when that is bf16/fp16, as stock autograd runs
            # the backward of a bf16 LM head (cuBLAS accumulates in fp32; d_weight still sums the chunks in fp32).
            # In fp32 a (chunk, V) x (V, H) product misses the tensor cores: on an H200 that made SparsePO's step
            # twice DPO's on a 0.5B model (BENCHMARKS.md). fp32 and fp64 activations keep fp32/fp64 products.
            gemm_dtype = hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else _up(hidden).dtype
            w = weight.to(gemm_dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]
                z, rz = _chunk_logits(h, ref_hidden[s : s + chunk], weight, bias, ref_weight, ref_bias)
                lse, rlse = all_lse[s : s + chunk], all_rlse[s : s + chunk]
                g_l, g_d = _up(grad_logratio[s : s + chunk, None]), _up(grad_neg_kl[s : s + chunk, None])
                d_z = z.sub_(lse).exp_().mul_(-(g_l + g_d))  # -(g_l + g_d) p
                d_z.add_(rz.sub_(rlse).exp_().mul_(g_d))  # + g_d p_ref
                d_z.scatter_add_(-1, labels[s : s + chunk, None], g_l)  # + g_l onehot(y)
                d_z = d_z.to(gemm_dtype)
                if need_h:
                    d_hidden[s : s + chunk] = (d_z @ w).to(hidden.dtype)
                if need_w:
                    d_weight += d_z.T @ h.to(gemm_dtype)
                if need_b:
                    d_bias += d_z.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (
            d_hidden,
            None,
            None,
            cast(d_weight, weight),
            cast(d_bias, bias) if bias is not None else None,
            None,
            None,
            None,
            None,
        )


def token_terms(
    hidden: Tensor,
    ref_hidden: Tensor,
    labels: Tensor,
    mask: Tensor,
    lm_head: nn.Module,
    ref_lm_head: nn.Module,
    chunk_size: int | None = None,
    logit_mapping: str = "none",
) -> tuple[Tensor, Tensor, Tensor]:
    """Token log-ratio l_t, -KL(pi_ref || pi)_t and the reference's mapped logits (``map_activation``; the mean
    logit by default, for MaPO's 'logits' hook),
    each shaped like ``mask`` and zero where it is False. Only masked positions are projected, through the
    heads' weights ``chunk_size`` tokens at a time (all at once when None); no (tokens, vocab) tensor
    outlives its chunk, in forward or backward."""
    h, rh, y = hidden[mask], ref_hidden[mask].to(hidden.dtype), labels[mask]
    chunk = chunk_size or max(1, h.shape[0])
    flat = _TokenTerms.apply(
        h, rh, y, lm_head.weight, lm_head.bias, ref_lm_head.weight, ref_lm_head.bias, chunk, logit_mapping
    )
    return tuple(torch.zeros(mask.shape, dtype=f.dtype, device=f.device).masked_scatter(mask, f) for f in flat)


def _sparsepo_forward(self, *args, sparsepo=None, **kwargs):
    """Policy forward patched in by SparsePOTrainer (like TRL's fused LM head): with ``sparsepo=...`` it
    runs the backbone, the chunked token terms and the mask networks inside the model's own forward, so
    DDP/DeepSpeed see every parameter it uses; without it, the original forward."""
    if sparsepo is None:
        return self._sparsepo_original_forward(*args, **kwargs)
    kwargs["use_cache"] = False
    for head_only in ("labels", "logits_to_keep", "num_items_in_batch"):  # PEFT passes some of these through
        kwargs.pop(head_only, None)
    hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    logratio, neg_kl, ref_logit_mean = token_terms(
        hidden,
        sparsepo["ref_hidden"],
        sparsepo["labels"],
        sparsepo["mask"],
        self.get_output_embeddings(),
        sparsepo["ref_lm_head"],
        sparsepo["chunk_size"],
        sparsepo.get("logit_mapping", "none"),
    )
    masks = {name: net(sparsepo["mask_inputs"], sparsepo["mask"]) for name, net in self.sparsepo_masks.items()}
    return {"logratio": logratio, "neg_kl": neg_kl, "ref_logit_mean": ref_logit_mean, "masks": masks}


# ------------------------------------------------------------------ activation capture (MaPO hook points)


def parse_hook_types(activation_hook: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of mlp, attn, resid, logits (as the official MAPOConfig)."""
    kinds = [k.strip() for k in activation_hook.split(",") if k.strip()]
    if "all" in kinds:
        return HOOK_TYPES[1:]
    return tuple(dict.fromkeys(kinds))


def map_activation(x: Tensor, mapping: str) -> Tensor:
    """Per-token scalar of one hook point's activations x (..., d), by ``activation_mapping`` (official
    ``apply_activation_mapping``): the feature mean of x (``zn_rescale``, ``none``), of sigmoid(x)
    (``sigmoid``), or of layer_norm(x) without affine weights (``layernorm``: near 0 by construction, as in
    the official code). ``zn_rescale`` is then z-normalised and min-max rescaled per sequence
    (``activation_mask``); the other mappings are used as they are."""
    x = _up(x)
    if mapping == "sigmoid":
        x = torch.sigmoid(x)
    elif mapping == "layernorm":
        x = F.layer_norm(x, x.shape[-1:])
    return x.mean(-1)


class ActivationCapture:
    """Per-token mapped activations of the reference (``map_activation``), recorded only while ``active``
    (the hooks stay on a policy that doubles as the PEFT reference). Keys: (type, point name, layer, part)."""

    def __init__(self, model, hook_type, mapping="zn_rescale"):
        self.active, self.features, self.mapping = False, {}, mapping
        kinds = [k for k in parse_hook_types(hook_type) if k != "logits"]
        points = hook_points(model)
        for kind in kinds:
            if not points[kind]:
                raise ValueError(
                    f"SparsePO activation masks: no {kind!r} hook points found in "
                    f"{type(model).__name__}; supported: Llama/Qwen/Mistral-style decoders, GPT-2, "
                    f"GPT-NeoX, GPT-BigCode. Use another activation_hook (e.g. logits)."
                )
            for index, (name, module, where, split) in enumerate(points[kind]):
                key = (kind, name, index)
                if where == "output":
                    module.register_forward_hook(lambda m, i, o, key=key, split=split: self._record(key, o, split))
                else:
                    module.register_forward_pre_hook(lambda m, i, key=key, split=split: self._record(key, i, split))

    def _record(self, key, value, split):
        if self.active:
            value = value[0] if isinstance(value, (tuple, list)) else value
            value = value.detach()
            if split is None:
                self.features[key] = map_activation(value, self.mapping)  # (N, S): the feature axis reduced at once
            else:
                for part, v in zip("qkv", split(value)):
                    self.features[(key[0], part, *key[2:])] = map_activation(
                        v.flatten(-2) if v.dim() > 3 else v, self.mapping
                    )


# ------------------------------------------------------------------------------------------- trainer


class SparsePOOutputs(dict):
    """``compute_loss(return_outputs=True)``: the token terms and masks, and ``logits`` (policy, full vocabulary),
    as keys and as attributes (DPO's ``prediction_step`` reads ``outputs.logits``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class SparsePOTrainer(MethodStateMixin, DPOTrainer):
    """DPOTrainer with the SparsePO loss: overrides ``_compute_loss``; the mask networks are its method state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        policy = inner_model(self.model)
        head = policy.get_output_embeddings()
        # A PEFT tuner layer on the head (LoRA, trainable tokens) keeps its delta outside ``.weight``, which the
        # chunked heads read. A full trained copy (modules_to_save) is fine: see _reference_pass.
        if hasattr(head, "base_layer") or hasattr(head, "token_adapter"):
            raise ValueError(
                f"SparsePO projects through the LM head's weight directly; a {type(head).__name__} on it "
                "(lora_target_modules / trainable_token_indices) is not supported: keep lm_head out of "
                "them (lora_modules_to_save: [lm_head] works)"
            )
        # Only the networks in use: one without gradients breaks DDP (find_unused_parameters off, or with
        # gradient checkpointing) and would sit in the optimizer and the checkpoints for nothing.
        if cfg.rw_kl_independent:
            names = [n for n, on in (("reward", cfg.mask_on_reward), ("kl", cfg.mask_on_kl)) if on]
        else:
            names = ["common"] if cfg.mask_on_reward or cfg.mask_on_kl else []
        nets = {n: build_mask_network(cfg, policy.config) for n in names} if cfg.mask_type == "learned" else {}
        # A submodule of the policy: the optimizer, DDP and DeepSpeed see it; kept out of the exported
        # model.safetensors (saved beside it instead) so the checkpoint still loads as a plain HF model.
        policy.sparsepo_masks = nn.ModuleDict(nets).to(policy.device)
        policy._keys_to_ignore_on_save = set(policy._keys_to_ignore_on_save or ()) | {
            f"sparsepo_masks.{k}" for k in policy.sparsepo_masks.state_dict()
        }
        if not hasattr(policy, "_sparsepo_original_forward"):
            policy._sparsepo_original_forward = policy.forward
            policy.forward = types.MethodType(_sparsepo_forward, policy)
        # The official trainer halves both L1 coefficients only when one common mask serves both terms.
        halve = cfg.mask_on_reward and cfg.mask_on_kl and not cfg.rw_kl_independent
        self.l1_reward = cfg.l1_norm_param_u / 2 if halve else cfg.l1_norm_param_u
        self.l1_kl = cfg.l1_norm_param_d / 2 if halve else cfg.l1_norm_param_d
        reference = policy if self.ref_model is None else inner_model(self.ref_model)
        self._capture = (
            ActivationCapture(reference, cfg.activation_hook, cfg.activation_mapping)
            if cfg.mask_type == "activation"
            else None
        )

    def create_optimizer(self, model=None):
        # Official grouping: the mask network's weights decay with mask_weight_decay, everything else as usual.
        decay = self.get_decay_parameter_names(self.model)
        mask_ids = {id(p) for p in inner_model(self.model).sparsepo_masks.parameters()}
        groups = [
            {
                "params": [
                    p
                    for n, p in self.model.named_parameters()
                    if p.requires_grad and id(p) not in mask_ids and n in decay
                ],
                "weight_decay": self.args.weight_decay,
            },
            {
                "params": [
                    p for n, p in self.model.named_parameters() if p.requires_grad and id(p) in mask_ids and n in decay
                ],
                "weight_decay": self.args.mask_weight_decay,
            },
            {
                "params": [p for n, p in self.model.named_parameters() if p.requires_grad and n not in decay],
                "weight_decay": 0.0,
            },
        ]
        if self.optimizer is None:
            cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    @staticmethod
    def _head_tensors(model):
        """The LM head's weight and bias as they are now. Read inside the adapter-disabled context: with PEFT
        ``modules_to_save: [lm_head]`` the head is a ModulesToSaveWrapper whose ``.weight`` is the trained copy
        while the adapter is on and the original head while it is off (the reference)."""
        head = model.get_output_embeddings()
        return types.SimpleNamespace(weight=head.weight, bias=getattr(head, "bias", None))

    def _reference_pass(self, model_kwargs):
        """Reference forward without its LM head (logits for the last position only): the last hidden
        state for the chunked KL, all hidden states for learned masks, hook activations for MaPO."""
        learned = self.args.mask_type == "learned"
        if self._capture is not None:
            self._capture.active, self._capture.features = True, {}
        try:
            # PEFT without a ref_model: the reference is the policy with its adapter off (``reference_model``)
            with torch.no_grad(), reference_model(self) as ref, capture_last_hidden_state(ref) as captured:
                out = ref(**model_kwargs, output_hidden_states=learned, logits_to_keep=1)
                ref_head = self._head_tensors(inner_model(ref))  # inside the context: the adapter is off
        finally:
            if self._capture is not None:
                self._capture.active = False
        hidden_states = [h[:, :-1] for h in out.hidden_states[1:]] if learned else None
        return captured["h"][:, :-1], hidden_states, ref_head

    def _terms_and_masks(self, model, inputs):
        """Token terms and masks of a batch: logratio, neg_kl, reward_mask, kl_mask, mask (all (2B, T-1))."""
        cfg = self.args
        mask = inputs["completion_mask"][:, 1:].bool()  # position t predicts token t+1
        labels = inputs["input_ids"][:, 1:].masked_fill(~mask, 0)
        model_kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        model_kwargs["use_cache"] = False

        ref_hidden, ref_hidden_states, ref_lm_head = self._reference_pass(model_kwargs)
        out = model(
            **model_kwargs,
            sparsepo={
                "ref_hidden": ref_hidden,
                "labels": labels,
                "mask": mask,
                "ref_lm_head": ref_lm_head,
                "chunk_size": cfg.kl_chunk_size,
                "mask_inputs": ref_hidden_states,
                "logit_mapping": cfg.activation_mapping,
            },
        )
        ones = torch.ones_like(out["logratio"])
        if cfg.mask_type == "learned":
            reward_mask = out["masks"].get("reward", out["masks"].get("common"))
            kl_mask = out["masks"].get("kl", out["masks"].get("common"))
        elif cfg.mask_type == "activation":
            reward_mask = kl_mask = self._activation_mask(out["ref_logit_mean"], mask)
        else:
            reward_mask = kl_mask = ones
        cm = mask.to(ones.dtype)  # masks are only defined on completion tokens
        return {
            "logratio": out["logratio"],
            "neg_kl": out["neg_kl"],
            "mask": mask,
            "reward_mask": (reward_mask if cfg.mask_on_reward else ones) * cm,
            "kl_mask": (kl_mask if cfg.mask_on_kl else ones) * cm,
        }

    @torch.no_grad()
    def token_masks(self, inputs) -> dict:
        """For analysis: the reward and KL masks (and token terms) of a collated batch, without gradients."""
        return self._terms_and_masks(self.model, self._prepare_inputs(inputs))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        cfg = self.args
        t = self._terms_and_masks(model, inputs)
        l1_u = self.l1_reward if cfg.mask_on_reward else 0.0
        l1_d = self.l1_kl if cfg.mask_on_kl else 0.0
        loss = sparsepo_loss(
            t["logratio"], t["neg_kl"], t["reward_mask"], t["kl_mask"], t["mask"], cfg.beta, l1_u, l1_d
        ).mean()
        self._log_metrics(mode, t["logratio"], t["neg_kl"], t["reward_mask"], t["kl_mask"], t["mask"])
        if cfg.mask_type == "learned" and not getattr(self, "_checked_dead_mask", False):
            self._checked_dead_mask = True
            learned = (t["reward_mask"] if cfg.mask_on_reward else 0) + (t["kl_mask"] if cfg.mask_on_kl else 0)
            if (cfg.mask_on_reward or cfg.mask_on_kl) and self.accelerator.gather(
                learned.detach().abs().sum()
            ).sum() == 0:
                logger.warning(
                    "SparsePO: the learned mask is exactly 0 on every completion token of the first batch "
                    "(ReLU dead at initialisation): no gradient reaches the policy or the mask. Try another "
                    "seed, or mask_mixer_activation: resc."
                )
        if not return_outputs:
            return loss
        # As DPO: the policy's logits from a plain forward (the chunked path builds none), for DPO's
        # prediction_step and compute_metrics; the SparsePO terms and masks ride along.
        with torch.no_grad():
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits
        return loss, SparsePOOutputs(logits=logits, **t)

    def _activation_mask(self, ref_logit_mean, mask):
        """Mean over hook types of the mean over each type's points. Every point weighs the same (the official
        code concatenates the points' features before the mean, which for ``none`` / ``layernorm`` weighs a
        point by its width and the logits by the vocabulary size; with its default ``zn_rescale`` it is the same)."""
        rescale = self.args.activation_mapping == "zn_rescale"
        normalise = (lambda f: activation_mask(f, mask)) if rescale else (lambda f: f.float() * mask)
        per_type: dict[str, list] = {}
        for (kind, *_), feature in self._capture.features.items():
            per_type.setdefault(kind, []).append(normalise(feature[:, :-1]))
        if "logits" in parse_hook_types(self.args.activation_hook):
            per_type["logits"] = [normalise(ref_logit_mean)]
        means = [torch.stack(v).mean(0) for v in per_type.values()]
        return torch.stack(means).mean(0)

    def _log_metrics(self, mode, logratio, neg_kl, reward_mask, kl_mask, mask):
        beta, cm = self.args.beta, mask.to(logratio.dtype)
        with torch.no_grad():
            rewards = beta * ((reward_mask * logratio * cm).sum(-1) + (kl_mask * neg_kl * cm).sum(-1))
            chosen, rejected = rewards.chunk(2)
            m = reward_mask * cm
            tokens = cm.sum(-1)
            stats = {
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": (chosen > rejected).float(),
                "mask/mean": m.sum(-1) / tokens.clamp_min(1),
                "mask/sparsity": ((reward_mask == 0) & mask).sum(-1) / tokens.clamp_min(1),
                "kl/seq": -(neg_kl * cm).sum(-1),
            }
            mass = m.sum(-1) / tokens.clamp_min(1)
            stats["mask/chosen_mass"], stats["mask/rejected_mass"] = mass.chunk(2)
            if self.args.rw_kl_independent and self.args.mask_on_kl:  # the KL mask is its own: report it too
                md = kl_mask * cm
                kl_mass = md.sum(-1) / tokens.clamp_min(1)
                stats["kl_mask/mean"] = kl_mass
                stats["kl_mask/sparsity"] = ((kl_mask == 0) & mask).sum(-1) / tokens.clamp_min(1)
                stats["kl_mask/chosen_mass"], stats["kl_mask/rejected_mass"] = kl_mass.chunk(2)
            for key, value in stats.items():
                self._metrics[mode][key].append(self.accelerator.gather(value.float()).mean().item())

    # ----------------------------------------------------------------------- mask network in checkpoints

    def method_state(self):
        """The mask networks' weights (``method_state.MethodStateMixin``; ZeRO-3: gathered); None without them."""
        nets = inner_model(self.model).sparsepo_masks
        if not len(nets.state_dict()):
            return None
        with gathered(nets.parameters()):
            return {"mask_networks": {k: v.detach().cpu().clone() for k, v in nets.state_dict().items()}}

    def load_method_state(self, state):
        nets = inner_model(self.model).sparsepo_masks
        with gathered(nets.parameters(), modifier_rank=0):
            current = nets.state_dict()
            nets.load_state_dict(
                {k: v.to(current[k].device, current[k].dtype) for k, v in state["mask_networks"].items()}
            )

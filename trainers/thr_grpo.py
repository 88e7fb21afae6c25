"""THR: Token Hidden Reward — steering GRPO between exploitation and exploration (arXiv 2510.03669).

Paper: Deng, Ren, Li, Gong, Sutherland, Li, Thrampoulidis, "Token Hidden Reward: Steering
Exploration-Exploitation in Group Relative Deep Reinforcement Learning", arXiv 2510.03669 (ICLR 2026).
Precursor, whose full text was read and which is implemented *exactly* here: NTHR, Deng, Ren, Li, Sutherland,
Li, Thrampoulidis, "On the Effect of Negative Gradient in Group Relative Deep Reinforcement Optimization"
(NeurIPS 2025). No official code was found for either; NTHR follows that paper's text, THR the abstract and reviews.

Delta from TRL's ``GRPOTrainer``: after generation and scoring, the per-sample advantages A_i are replaced by
per-token advantages A'_{i,k} computed per prompt group from the *old* policy's final-layer hidden states and its
next-token probabilities sliced to V*, the set of token ids generated in that group (TRL's ``_compute_loss``
accepts (B, T) advantages).

Equations, for one prompt group of G completions y_i with rewards r_i, correct set P = {i : r_i >= threshold}:

    A_i        = (r_i - mean r) / (std_unbiased(r) + 1e-4)                   TRL scale_rewards="group"
    h_{i,k}    = final hidden state feeding the LM head at token k of y_i    (d,)
    q_{i,k}    = pi_old(. | x, y_{i,<k}) restricted to V* (not renormalised)   (K,) with K = |V*|
    g_{i,k}    = e_{y_{i,k}} - q_{i,k}                                       prediction error in V*
    M+         = sum_{i in P} sum_k g_{i,k} h_{i,k}^T                        (K, d)
    s_{i,k}    = g_{i,k}^T M+ h_{i,k} = sum_{i' in P} sum_k' <g_{i',k'}, g_{i,k}> <h_{i',k'}, h_{i,k}>
    tau        = beta * min_{i in P} mean_k s_{i,k}                          beta = 1

  NTHR (exact): for incorrect j, tokens with s_{j,k} > tau get  A'_{j,k} = eta A_j,  eta = 2 |0.5 - rho|,
  rho = |P| / G; every other token keeps A_i.

  THR (reconstruction): THR_{i,k} = A_i s_{i,k}; dominant tokens are those with |s_{i,k}| > tau;
      reweight:       A'_{i,k} = A_i (1 + p sgn THR_{i,k}) on dominant tokens, A_i elsewhere
      dominant_only:  A'_{i,k} = A_i (1 + p sgn THR_{i,k}) on dominant tokens, 0 elsewhere ("THR-only")
  p > 0 amplifies tokens whose update raises the likelihood of the correct answers (exploitation, greedy
  accuracy), p < 0 the others (exploration, Pass@K); p = 0 with ``reweight`` is GRPO.

Groups with |P| = 0 or |P| = G are skipped: they keep the plain GRPO advantages (``token_influence`` signals
this with tau = +inf).

Caution: THR's functional form is a **reconstruction** (unverified against the paper's text): only its abstract
and its reviews could be read. Whether THR carries extra positive scale factors, whether dominance compares
|s| or |THR| with tau, and how p enters are guesses consistent with those sources and with NTHR. That is why
the rule (``thr_mode``), the threshold scale (``thr_beta``) and the steering scalar (``thr_p``) are options.

GSPO integration: ``importance_sampling_level="sequence_token"`` selects GSPO-token (token weight
sg[s_i] pi(y_t)/sg[pi(y_t)], s_i the length-normalised sequence ratio), under which per-token advantages stay
meaningful; TRL's own ``"sequence"`` level multiplies one (B, 1) ratio by the (B, T) advantages and mixes them.
The shift lives in the importance ratio only (``gspo_token_old_logps`` replaces the old log-probs the ratio divides
by): TRL's KL term (``beta > 0``) and its off-policy mask are evaluated at the current policy's log-probs.

Implementation notes: the sliced probabilities are exp(logits[V*] - logsumexp(logits over the full vocabulary));
only the normaliser needs the full vocabulary, computed in token chunks. The logits are those TRL's fused log-prob
head scores the loss with: the LM head, the model's logit scale and final softcapping (Cohere, Gemma-2, ...; see
``lm_head_logit_transform``), then the sampling temperature; the backbone runs under ``accelerator.autocast()``.
Vision-language inputs (pixel values, ...) are refused: the old-policy forward passes token ids only. The hidden
states need one no-grad forward of the old policy per generation batch: TRL's own old-log-prob forward (when it runs
at all) goes through its fused LM head, which returns no hidden states. It is skipped when no group of the batch is
mixed, and with ``thr_p = 0`` under ``reweight`` (the advantages are GRPO's whatever s is; the THR statistics are
then not logged). Groups may span processes: the per-token inputs are gathered, every rank computes every group,
then keeps its own rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig
from trl import GRPOConfig, GRPOTrainer

from posttrain.trainers.advantages import work_dtype
from posttrain.trainers.trl_seam import (
    capture_last_hidden_state,
    disable_gradient_checkpointing,
    gather_padded,
    inner_model,
    maybe_gather_lm_head_ctx,
)

THR_MODES = ("reweight", "dominant_only", "nthr")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
# Inputs of TRL 1.16's _get_per_token_logps_and_entropies that only vision-language models carry.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class THRGRPOConfig(GRPOConfig):
    """GRPOConfig plus the THR / NTHR settings. Defaults: p = 0 with ``reweight`` (plain GRPO), NTHR's beta = 1."""

    thr_p: float = field(
        default=0.0,
        metadata={
            "help": "THR steering scalar p: dominant tokens get A (1 + p sgn THR). p > 0 exploitation (greedy "
            "accuracy), p < 0 exploration (Pass@K), 0 = GRPO (with thr_mode=reweight). |p| <= 1 keeps every "
            "token's advantage sign; larger |p| is allowed but flips the sign of some tokens' advantages. "
            "Ignored by thr_mode=nthr."
        },
    )
    thr_mode: str = field(
        default="reweight",
        metadata={
            "help": "reweight (dominant tokens reweighted, others keep A), dominant_only (others get 0: "
            "'THR-only' training) or nthr (NTHR: selected tokens of incorrect samples get eta A)."
        },
    )
    thr_beta: float = field(
        default=1.0,
        metadata={
            "help": "threshold scale beta: tau = beta * min over correct samples of their mean token influence "
            "(NTHR uses 1; its ablation: -inf, 0, 0.1, 1)."
        },
    )
    correct_threshold: float = field(
        default=1.0,
        metadata={"help": "a completion counts as correct (an anchor of M+) when its total reward is >= this."},
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={
            "help": "token (GRPO), sequence (TRL's GSPO: one ratio per sequence, which mixes per-token "
            "advantages) or sequence_token (GSPO-token: sg[s_i] pi(y_t)/sg[pi(y_t)], recommended with THR "
            "when a sequence-level ratio is wanted; only the importance ratio changes: the KL term and the "
            "off-policy mask use the current log-probs)."
        },
    )

    def __post_init__(self):
        # TRL 1.16's GRPOConfig.__post_init__ does not validate importance_sampling_level (only the trainer's
        # loss does, at the first step), so "sequence_token" passes through it unchanged; validate here.
        super().__post_init__()
        if self.thr_mode not in THR_MODES:
            raise ValueError(f"thr_mode={self.thr_mode!r}; valid: {', '.join(THR_MODES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}; "
                f"valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        if not math.isfinite(self.thr_p):
            raise ValueError(f"thr_p must be finite (got {self.thr_p})")
        if math.isnan(self.thr_beta):
            raise ValueError("thr_beta must not be NaN")


# ----------------------------------------------------------------------------------------------- pure math


def generated_vocab(token_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The group's generated-token set V* and each token's index in it.

    token_ids (G, T), completion_mask (G, T). Returns vocab (K,) = V*, the sorted unique ids among the valid
    completion tokens, and token_pos (G, T), the index of each sampled token in V* (0 on masked positions).
    """
    mask = completion_mask.bool()
    vocab = torch.unique(token_ids[mask])  # sorted
    pos = torch.searchsorted(vocab, token_ids.contiguous()).clamp_max(max(vocab.numel() - 1, 0))
    return vocab, torch.where(mask, pos, torch.zeros_like(pos))


def slice_to_generated_vocab(
    probs_full: Tensor, token_ids: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Restrict next-token probabilities (G, T, V) to V* (``generated_vocab``): returns probs (G, T, K) =
    probs_full[..., V*] (not renormalised), token_pos (G, T) and vocab (K,). The trainer never forms the full
    distribution: it computes the head's logits on V* only (``THRGRPOTrainer._thr_head_logits``)."""
    vocab, token_pos = generated_vocab(token_ids, completion_mask)
    return probs_full.index_select(-1, vocab), token_pos, vocab


def prediction_errors(probs: Tensor, token_pos: Tensor, completion_mask: Tensor) -> Tensor:
    """g = onehot(token_pos, K) - probs (G, T, K), zero on masked positions; float32 (float64 if given).
    K = 0 (every token masked: V* is empty) gives an empty (G, T, 0)."""
    dtype = work_dtype(probs)
    mask = completion_mask.bool()
    if probs.shape[-1] == 0:
        return probs.to(dtype)
    pos = torch.where(mask, token_pos, torch.zeros_like(token_pos)).long()
    g = F.one_hot(pos, probs.shape[-1]).to(dtype) - probs.to(dtype)
    return g * mask.unsqueeze(-1).to(dtype)


def anchor_matrix(hidden: Tensor, probs: Tensor, token_pos: Tensor, completion_mask: Tensor, correct: Tensor) -> Tensor:
    """M+ = sum over the valid tokens of the correct samples of g h^T, shape (K, d)."""
    dtype = work_dtype(hidden, probs)
    g = prediction_errors(probs.to(dtype), token_pos, completion_mask)
    return _anchor_from_errors(g, hidden.to(dtype), correct)


def _anchor_from_errors(g: Tensor, h: Tensor, correct: Tensor) -> Tensor:
    return torch.einsum("gtk,gtd->kd", g * correct.to(g.dtype)[:, None, None], h)


@torch.no_grad()
def token_influence(
    hidden: Tensor, probs: Tensor, token_pos: Tensor, completion_mask: Tensor, correct: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Influence s (G, T) of every completion token on the correct samples, and the threshold tau.

    hidden (G, T, d): final hidden states; probs (G, T, K): next-token probabilities sliced to V*; token_pos
    (G, T): index of the sampled token in V*; completion_mask (G, T); correct (G,) bool. With g = e_y - q,
    M+ = sum_{correct i, valid k} g h^T and s = g^T M+ h (0 on masked positions); tau = beta * min over the
    correct samples (with at least one valid token) of their mean s. ``beta = -inf`` gives tau = -inf.

    Groups with no correct sample or only correct samples, or whose correct samples have no valid token (for
    instance every completion masked as truncated, so V* may be empty: K = 0), are skipped: s is all zeros and
    tau = +inf, which
    makes ``thr_advantages`` and ``nthr_advantages`` return the plain advantages. tau is a 0-d tensor (no host
    sync). Computed in float32, or float64 when hidden or probs are float64.
    """
    dtype = work_dtype(hidden, probs)
    mask = completion_mask.bool()
    maskf = mask.to(dtype)
    correct = correct.bool()
    h = hidden.to(dtype)
    g = prediction_errors(probs.to(dtype), token_pos, mask)
    M = _anchor_from_errors(g, h, correct)  # anchor_matrix
    s = ((g @ M) * h).sum(-1) * maskf

    n_tok = maskf.sum(-1)
    mean_s = s.sum(-1) / n_tok.clamp_min(1)
    anchors = correct & (n_tok > 0)
    inf = torch.tensor(math.inf, dtype=dtype, device=s.device)
    s_min = torch.where(anchors, mean_s, inf).amin()
    if beta == -math.inf:
        tau = -inf
    else:
        tau = torch.where(torch.isfinite(s_min), beta * s_min, inf)
    n_pos = correct.sum()
    skip = (n_pos == 0) | (n_pos == correct.numel()) | ~anchors.any()
    s = torch.where(skip, torch.zeros_like(s), s)
    tau = torch.where(skip, inf, tau)
    return s, tau


def _as_tensor(x, like):
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


@torch.no_grad()
def thr_advantages(
    advantages: Tensor, s: Tensor, tau: Tensor | float, p: float, completion_mask: Tensor, mode: str = "reweight"
) -> Tensor:
    """THR per-token advantages (G, T) for one group (reconstruction, see the module docstring).

    advantages (G,): per-sample GRPO advantages; s (G, T), tau: from ``token_influence``; p: steering scalar.
    THR = A_i s_{i,k}; dominant tokens have |s| > tau. ``reweight``: dominant tokens get A_i (1 + p sgn THR), the
    others A_i. ``dominant_only``: dominant tokens as before, the others 0. Masked positions are 0. tau = +inf
    (a skipped group) gives the plain advantages in both modes.
    """
    if mode not in ("reweight", "dominant_only"):
        raise ValueError(f"mode={mode!r}; valid: reweight, dominant_only (NTHR: use nthr_advantages)")
    dtype = work_dtype(advantages, s)
    s = s.to(dtype)
    A = advantages.to(dtype)[:, None].expand_as(s)
    tau = _as_tensor(tau, s)
    dominant = s.abs() > tau
    steered = A * (1 + p * torch.sign(A * s))
    if mode == "reweight":
        out = torch.where(dominant, steered, A)
    else:
        out = torch.where(dominant, steered, torch.where(tau == math.inf, A, torch.zeros_like(A)))
    return out * completion_mask.to(dtype)


@torch.no_grad()
def nthr_advantages(
    advantages: Tensor, s: Tensor, tau: Tensor | float, correct: Tensor, completion_mask: Tensor
) -> Tensor:
    """NTHR per-token advantages (G, T) for one group (exact, as in the NTHR paper).

    Tokens of incorrect samples with s > tau get eta A_j, eta = 2 |0.5 - rho|, rho = N+ / G; every other valid
    token keeps A_i; masked positions are 0. Groups with N+ = 0 or N+ = G keep the plain advantages.
    """
    dtype = work_dtype(advantages, s)
    s = s.to(dtype)
    A = advantages.to(dtype)[:, None].expand_as(s)
    correct = correct.bool()
    n_pos = correct.sum()
    G = correct.numel()
    rho = n_pos.to(dtype) / G
    eta = 2 * (0.5 - rho).abs()
    selected = (~correct)[:, None] & (s > _as_tensor(tau, s)) & completion_mask.bool()
    selected &= (n_pos > 0) & (n_pos < G)
    return torch.where(selected, eta * A, A) * completion_mask.to(dtype)


def gspo_token_old_logps(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """The old log-probs that make a token-level ratio GSPO-token's (Zheng et al., arXiv 2507.18071).

    Returns sg[logps - seq] with seq = the masked mean of (logps - old_logps) per sequence, so that
    logps - result has the value of the length-normalised sequence log-ratio and the gradient of logps (B, T).
    Only the importance ratio is meant to use it: KL terms and off-policy masks keep the true log-probs.
    """
    logps = logps.detach()
    mask = mask.to(logps.dtype)
    seq = ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return logps - seq


def lm_head_logit_transform(config: PretrainedConfig) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) of a model config, read the way TRL 1.16's ``add_fused_lm_head``
    (trl/trainer/utils.py) reads them for the log-probs of the loss: ``logit_scale`` (Cohere), else
    ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1), else 1 / ``logits_scaling`` (Granite, MiniCPM3;
    HyperCLOVA X multiplies); ``final_logit_softcapping`` (Gemma-2) or None."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def postprocess_logits(
    logits: Tensor, logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0
) -> Tensor:
    """The sampling logits from raw LM-head outputs, in TRL 1.16's order (trl/kernels/chunked_logprob.py
    ``_torch_transform``): scale, then softcap * tanh(z / softcap), then divide by the temperature."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


# ------------------------------------------------------------------------------------------- trainer


class THRGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with THR/NTHR per-token advantages: overrides ``_generate_and_score_completions`` (and, for
    GSPO-token, wraps ``_compute_loss``)."""

    _gspo_token = None  # (the loss's copy of inputs, loss mask) while a GSPO-token loss is computed

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL gathers the rewards of the whole generation batch over processes here: keep them for "correct".
        self._thr_rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._thr_rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            rewards = (self._thr_rewards_per_func * self.reward_weights.to(self._thr_rewards_per_func.device)).nansum(1)
            out["advantages"] = self.thr_token_advantages(out, rewards)
        return out

    def thr_token_advantages(self, out, rewards):
        """(B, T) advantages of this process's completions. ``rewards`` (N,) are those of the whole generation
        batch (all processes, in process order), ``out`` holds this process's prompt/completion ids and masks
        and its (B,) GRPO advantages. Hidden states are gathered so every group is complete wherever it is
        computed; every rank computes every group (identical results), then keeps its own rows."""
        cfg, acc = self.args, self.accelerator
        completion_ids = out["completion_ids"]
        present = [key for key in MULTIMODAL_KEYS if out.get(key) is not None]
        if present:
            raise ValueError(
                f"THR-GRPO does not support multimodal inputs ({', '.join(present)}): the old-policy "
                "forward that gives the hidden states feeds the language backbone token ids only; use "
                "method: grpo for vision-language models"
            )
        # TRL's loss mask: completion tokens that are the policy's own (tool results have tool_mask = 0; truncated
        # completions are already zeroed under mask_truncated_completions). Only these tokens enter V*, M+, tau, s.
        tool_mask = out.get("tool_mask")
        completion_mask = out["completion_mask"] if tool_mask is None else out["completion_mask"] * tool_mask
        local_b, local_t = completion_ids.shape
        G = self.num_generations
        correct = (rewards >= cfg.correct_threshold).to(completion_ids.device)
        n_correct = correct.view(-1, G).sum(1)
        mixed = (n_correct > 0) & (n_correct < G)
        if not mixed.any() or self._thr_is_neutral():
            # No mixed group anywhere (rewards are global, so every rank takes this branch), or p = 0 with
            # reweight: THR leaves every advantage as GRPO's, and the old-policy forward is not needed at all.
            # (The thr/dominant, positive, negative, abs_s and tau statistics are then not logged.)
            self._metrics["train"]["thr/mixed_groups"].append(float(mixed.sum()))
            return out["advantages"][:, None] * completion_mask
        hidden, lse = self._old_policy_hidden_and_lse(out)
        ids, mask, hidden, lse = gather_padded(acc, completion_ids, completion_mask, hidden, lse)
        mask = mask.bool()
        advantages = acc.gather(out["advantages"].float())

        result = advantages[:, None] * mask
        stats = {"dominant": [], "positive": [], "negative": [], "abs_s": [], "tau": []}
        head = inner_model(self.model).get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            for start in range(0, ids.size(0), G):
                rows = slice(start, start + G)
                n_correct = int(correct[rows].sum())
                m = mask[rows]
                if n_correct in (0, G) or not (m & correct[rows, None]).any():
                    continue  # all-correct / all-wrong groups, or no valid token to anchor M+: GRPO's advantages
                vocab, token_pos = generated_vocab(ids[rows], m)
                logits = self._thr_head_logits(hidden[rows], vocab)  # the head on V* only
                probs = (logits - lse[rows, :, None]).exp() * m[..., None]
                s, tau = token_influence(hidden[rows], probs, token_pos, m, correct[rows], beta=cfg.thr_beta)
                if cfg.thr_mode == "nthr":
                    group = nthr_advantages(advantages[rows], s, tau, correct[rows], m)
                else:
                    group = thr_advantages(advantages[rows], s, tau, cfg.thr_p, m, mode=cfg.thr_mode)
                result[rows] = group
                dominant = (s.abs() > tau) & m
                thr_sign = torch.sign(advantages[rows, None] * s)
                stats["dominant"].append(dominant.sum() / m.sum().clamp_min(1))
                stats["positive"].append(((thr_sign > 0) & dominant).sum() / dominant.sum().clamp_min(1))
                stats["negative"].append(((thr_sign < 0) & dominant).sum() / dominant.sum().clamp_min(1))
                stats["abs_s"].append(s.abs()[m].mean())
                stats["tau"].append(torch.as_tensor(tau, dtype=torch.float32))
        for key, values in stats.items():  # identical on every rank: no reduction needed
            if values:
                self._metrics["train"][f"thr/{key}"].append(
                    torch.stack([v.float().cpu() for v in values]).mean().item()
                )
        self._metrics["train"]["thr/mixed_groups"].append(float(len(stats["tau"])))
        rank = acc.process_index
        return result[rank * local_b : (rank + 1) * local_b, :local_t]

    def _thr_is_neutral(self):
        """True when THR cannot change any advantage: ``thr_mode=reweight`` with p = 0 gives A (1 + 0) = A on
        dominant tokens and A elsewhere, so the influence scores (and the forward that feeds them) are not needed."""
        return self.args.thr_mode == "reweight" and self.args.thr_p == 0

    @torch.no_grad()
    def _old_policy_hidden_and_lse(self, out):
        """Final hidden states feeding the LM head at the positions that predict each completion token (B, T, d),
        and the log-normaliser of the sampling distribution there (B, T), fp32. One no-grad forward of the
        backbone in per-device batches under ``accelerator.autocast()`` (as TRL's own log-prob forward); the head is
        applied in token chunks, never to the whole batch, with the model's logit post-processing (see
        ``_thr_head_logits``)."""
        prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        hiddens, lses = [], []
        batch = self.args.per_device_train_batch_size
        with capture_last_hidden_state(self.model) as captured:
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                for i in range(0, input_ids.size(0), batch):
                    with self.accelerator.autocast():
                        self.model(
                            input_ids=input_ids[i : i + batch],
                            attention_mask=attention_mask[i : i + batch],
                            logits_to_keep=1,
                            use_cache=False,
                        )
                    h = captured["h"][:, prompt_ids.size(1) - 1 : -1].float()
                    hiddens.append(h)
                    lses.append(self._chunked_lse(h))
        return torch.cat(hiddens), torch.cat(lses)

    def _chunked_lse(self, hidden, chunk=1024):
        flat = hidden.reshape(-1, hidden.size(-1))
        head = inner_model(self.model).get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            out = [self._thr_head_logits(flat[s : s + chunk]).logsumexp(-1) for s in range(0, flat.size(0), chunk)]
        return torch.cat(out).view(hidden.shape[:-1])

    @torch.no_grad()
    def _thr_head_logits(self, hidden, vocab=None):
        """Sampling logits (..., |vocab|) of hidden states, over the full vocabulary when ``vocab`` is None: the LM
        head in fp32, then the model's own post-processing as TRL's fused log-prob head applies it (logit scale,
        final softcapping: ``lm_head_logit_transform``) and the sampling temperature. Under ZeRO-3 the caller holds
        the head gathered (``maybe_gather_lm_head_ctx``)."""
        inner = inner_model(self.model)
        head = inner.get_output_embeddings()
        scale, softcap = lm_head_logit_transform(inner.config)
        weight = head.weight if vocab is None else head.weight[vocab]
        bias = None if head.bias is None else (head.bias if vocab is None else head.bias[vocab])
        logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        return postprocess_logits(logits, scale, softcap, self.temperature)

    # --------------------------------------------------------------------------------------- GSPO-token

    def _compute_loss(self, model, inputs):
        if self.args.importance_sampling_level != "sequence_token":
            return super()._compute_loss(model, inputs)
        # GSPO-token (Zheng et al., arXiv 2507.18071): log w_t = sg[mean_t(log pi - log pi_old)] + log pi_t
        # - sg[log pi_t]. TRL 1.16's token-level branch forms log_ratio = per_token_logps - old_per_token_logps and
        # reads ``inputs["old_per_token_logps"]`` only after the log-prob forward, so the hook below replaces the
        # old log-probs of a copy of ``inputs`` by sg[log pi - seq]: only the importance ratio moves. The KL term,
        # CISPO's log pi factor and the entropy still see the current log-probs, and the off-policy mask still
        # compares them with the true old (or sampling) log-probs. On-policy (no old log-probs) the ratio is 1 in
        # value either way and nothing changes.
        tool_mask = inputs.get("tool_mask")
        mask = inputs["completion_mask"] if tool_mask is None else inputs["completion_mask"] * tool_mask
        inputs = dict(inputs)
        self._gspo_token, self.importance_sampling_level = (inputs, mask), "token"
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._gspo_token, self.importance_sampling_level = None, "sequence_token"

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._gspo_token is not None:
            inputs, mask = self._gspo_token
            self._gspo_token = None  # one forward per loss
            old = inputs.get("old_per_token_logps")
            if old is not None:
                inputs.setdefault("sampling_per_token_logps", old)  # TRL's off-policy mask default: the true old
                inputs["old_per_token_logps"] = gspo_token_old_logps(logps, old, mask)
        return logps, entropies, aux

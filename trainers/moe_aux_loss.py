"""The auxiliary balance loss: the baseline that auxiliary-loss-free balancing (``trainers/moe_balance.py``) replaces.

``aux_balance_loss`` is the batch-wise loss alpha * sum_i f_i P_i (Switch Transformer / GShard form, the aux-loss
baseline of Wang et al., arXiv 2408.15664, and Qwen-MoE's and Mixtral's ``load_balancing_loss_func``);
``sequence_aux_balance_loss`` is DeepSeek-V3's sequence-wise form (arXiv 2412.19437, eqs. 17-20). ``RouterAuxLoss``
adds either to the gradients of any trainer through forward hooks on the routers, for models that have no balance
loss of their own (DeepSeek-V3, GLM-4-MoE in transformers 5.24): ``moe_balance: aux_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.trainers.moe_routers import SOFTMAX_ROUTERS, in_backward, router_num_experts
from posttrain.trainers.runtime import sum_over_ranks

AUX_LOSS_SCOPES = ("batch", "sequence")


def aux_balance_loss(
    scores: Tensor, indices: Tensor, num_experts: int, alpha: float = 1e-3, mask: Tensor | None = None
) -> Tensor:
    """Batch-wise auxiliary balance loss alpha * sum_i f_i P_i over all N tokens (the aux-loss baseline of Wang et
    al.; Switch Transformer / GShard form, as Qwen-MoE's and Mixtral's ``load_balancing_loss_func``).

    scores (N, E) affinities with gradient, indices (N, K) the selected experts, mask (N,) optional (pads out).
    f_i = E / (K T) * #{t : i selected} (no gradient), P_i = mean_t s_{t,i} / sum_j s_{t,j}, T = the unmasked
    tokens. Equals alpha at perfect balance with uniform affinities. DeepSeek-V3's per-sequence form:
    ``sequence_aux_balance_loss``.
    """
    s = scores.reshape(-1, num_experts)
    idx = indices.reshape(-1, indices.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, idx = s[keep], idx[keep]
    T, K = idx.shape
    if T == 0:
        return s.sum() * 0.0
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(s.dtype) * (num_experts / (K * T))
    P = (s / (s.sum(dim=-1, keepdim=True) + 1e-20)).mean(dim=0)
    return alpha * (f.detach() * P).sum()


def sequence_aux_balance_loss(
    scores: Tensor, indices: Tensor, num_experts: int, alpha: float = 1e-3, mask: Tensor | None = None
) -> Tensor:
    """Sequence-wise balance loss of DeepSeek-V3 (arXiv 2412.19437, eqs. 17-20), averaged over the sequences.

    scores (B, T, E) affinities with gradient, indices (B, T, K), mask (B, T) optional (pads out). For each sequence
    b with T_b unmasked tokens: f_{b,i} = E / (K T_b) * #{t : i selected} (no gradient), P_{b,i} = mean_t s'_{t,i}
    with s'_{t,i} = s_{t,i} / sum_j s_{t,j}, and L_b = sum_i f_{b,i} P_{b,i}; the loss is alpha * mean_b L_b over
    the sequences with T_b > 0 (DeepSeek-V2's gate, ``seq_aux``, averages over the batch the same way). Unlike
    ``aux_balance_loss`` (one f and P over the whole batch) it penalises imbalance inside each sequence.
    """
    if scores.dim() != 3 or indices.dim() != 3 or scores.shape[:2] != indices.shape[:2]:
        raise ValueError(
            f"scores (B, T, E) and indices (B, T, K) expected, got {tuple(scores.shape)} and {tuple(indices.shape)}"
        )
    B, T, K = indices.shape
    keep = (
        torch.ones(B, T, dtype=scores.dtype, device=scores.device)
        if mask is None
        else mask.reshape(B, T).to(scores.device, scores.dtype)
    )
    tokens = keep.sum(dim=1)  # (B,)
    if not bool((tokens > 0).any()):
        return scores.sum() * 0.0
    per_token = keep.unsqueeze(-1).expand(B, T, K).reshape(B, T * K)
    counts = torch.zeros(B, num_experts, dtype=scores.dtype, device=scores.device).scatter_add_(
        1, indices.reshape(B, T * K).to(scores.device), per_token
    )
    denom = tokens.clamp(min=1).unsqueeze(1)
    f = counts * (num_experts / K) / denom
    normed = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    P = (normed * keep.unsqueeze(-1)).sum(dim=1) / denom
    per_seq = (f.detach() * P).sum(dim=-1)
    return alpha * per_seq[tokens > 0].mean()


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on ``output``; its backward also feeds d(loss)/d(aux) = ``scale`` into ``aux``'s graph.

    This is how an auxiliary loss reaches the gradients without the trainer's loss knowing about it (Megatron-LM's
    ``MoEAuxLossAutoScaler`` does the same): ``aux`` is computed from the router's affinities in a forward hook
    and tied to the router's gate weights, which always lie on the path to the loss. Nothing is saved for backward.
    """

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        ctx.scale = float(scale)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.aux_meta
        return grad_output, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class RouterAuxLoss:
    """posttrain's own auxiliary balance loss (``moe_balance: aux_loss``) for routers whose model has none.

    DeepSeek-V3 and GLM-4-MoE in transformers 5.24 have no load-balancing loss (no ``router_aux_loss_coef``), and TRL's
    aux-loss path crashes on their configs (the forward that TRL 1.16's ``add_fused_lm_head`` installs reads
    ``num_experts``, which ``DeepseekV3Config`` lacks). This adds ``aux_balance_loss`` (alpha * sum_i f_i P_i,
    per layer, the selection being the router's own) to the gradients of any trainer, through a forward hook on each
    router: the loss is computed from the router logits (sigmoid affinities for DeepSeek-style routers, softmax for
    Qwen/Mixtral ones) and ``_InjectAuxLoss`` ties it to the gate weights with backward scale ``scale_fn()`` (1 / the
    gradient-accumulation steps, as the trainers scale their own loss). Forwards under no_grad or in eval mode are left
    alone. Gradient checkpointing: the recomputation in backward computes the same loss again (so the checkpoint's
    saved tensors match), with the padding mask of the original forward (kept per layer); each forward adds to the
    logged value once. ``mask_source``: a ``RoutingCounter`` whose ``_mask`` is the current forward's padding
    mask (pads are left out of f and P), or None.

    ``scope``: "batch" (``aux_balance_loss`` over all tokens of the forward) or "sequence" (DeepSeek-V3's
    ``sequence_aux_balance_loss``, per batch row). The routers see flattened tokens, so "sequence" needs ``model``:
    a forward pre-hook on it records the number of rows of each forward (``input_ids`` / ``inputs_embeds`` /
    ``attention_mask``); with packed rows (``padding_free``) a row holding several sequences counts as one.
    """

    def __init__(self, routers, alpha=1e-3, scale_fn=None, mask_source=None, scope="batch", model=None):
        if scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"scope={scope!r}; valid: {', '.join(AUX_LOSS_SCOPES)}")
        if scope == "sequence" and model is None:
            raise ValueError("the sequence-wise aux loss needs the model (to see the batch rows of each forward)")
        self.routers = routers
        self.alpha = alpha
        self.scope = scope
        self._rows = None  # rows of the model's current forward (sequence scope)
        self._layer_rows = [None] * len(routers)
        self.scale_fn = scale_fn or (lambda: 1.0)
        self.mask_source = mask_source
        self.num_experts = [router_num_experts(m) for _, m in routers]
        self.softmax = [type(m).__name__ in SOFTMAX_ROUTERS for _, m in routers]
        self._masks = [None] * len(routers)
        self._logged = [True] * len(routers)
        self.total = 0.0  # sum over layers and forwards since reset()
        self.forwards = 0  # forwards of layer 0 since reset()
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(routers)]
        if scope == "sequence":
            self._handles.append(model.register_forward_pre_hook(self._keep_rows, with_kwargs=True))

    def _keep_rows(self, module, args, kwargs):
        if in_backward():  # a reentrant checkpoint does not rerun the model's forward; keep what the layers saw
            return
        first = next(
            (
                kwargs[k]
                for k in ("input_ids", "inputs_embeds", "attention_mask")
                if isinstance(kwargs.get(k), torch.Tensor)
            ),
            args[0] if args and isinstance(args[0], torch.Tensor) else None,
        )
        self._rows = int(first.shape[0]) if first is not None and first.dim() >= 2 else None

    def _make_hook(self, i):
        def hook(module, args, output):
            recompute = in_backward()
            if not recompute:
                src = self.mask_source._mask if self.mask_source is not None else None
                self._masks[i] = src
                self._layer_rows[i] = self._rows
                self._logged[i] = False
            if not (torch.is_grad_enabled() and module.training):
                return None
            logits, weights, indices = output
            if not weights.requires_grad:  # frozen router (e.g. LoRA): nothing to balance
                return None
            idx = indices.reshape(-1, indices.shape[-1])
            mask = self._masks[i]
            mask = mask.reshape(-1).to(idx.device) if mask is not None and mask.numel() == idx.shape[0] else None
            logits = logits.reshape(-1, logits.shape[-1]).float()
            scores = logits.softmax(dim=-1) if self.softmax[i] else logits.sigmoid()
            if self.scope == "sequence":
                rows, n = self._layer_rows[i], idx.shape[0]
                if not rows or n % rows:
                    raise RuntimeError(
                        f"sequence-wise aux loss: router {self.routers[i][0]} saw {n} tokens, which do "
                        f"not split into the forward's batch rows ({rows}); use moe_aux_loss_scope: batch"
                    )
                aux = sequence_aux_balance_loss(
                    scores.view(rows, n // rows, -1),
                    idx.view(rows, n // rows, -1),
                    self.num_experts[i],
                    alpha=self.alpha,
                    mask=None if mask is None else mask.view(rows, n // rows),
                )
            else:
                aux = aux_balance_loss(scores, idx, self.num_experts[i], alpha=self.alpha, mask=mask)
            if not self._logged[i]:  # once per forward: the original one, or the recomputation of a reentrant
                self._logged[i] = True  # checkpoint (whose original forward runs under no_grad)
                self.total = self.total + aux.detach()  # a tensor: no host sync per layer
                self.forwards += i == 0
            return output[0], _InjectAuxLoss.apply(weights, aux, self.scale_fn()), indices

        return hook

    def reset(self):
        self.total, self.forwards = 0.0, 0

    def mean(self):
        """The aux loss (summed over layers, alpha included) per forward since reset(), over all data-parallel ranks
        when torch.distributed is initialised (every rank logs the same number); 0 if none."""
        both = torch.tensor([float(self.total), float(self.forwards)], dtype=torch.float64)
        total, forwards = sum_over_ranks(both).tolist()
        return total / forwards if forwards else 0.0

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

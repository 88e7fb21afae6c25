"""``optim: muon`` for any LLM recipe: Muon on the hidden 2-D matrices, AdamW on everything else.

Muon (K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/; official code: KellerJordan/Muon) orthogonalises each matrix's Nesterov
momentum with a few Newton-Schulz iterations. It is meant for the hidden weight matrices only: the embeddings, the
output head (LM head, reward score head) and every 1-D parameter (norms, biases) stay on AdamW. Both halves are
torch's own optimizers (``torch.optim.Muon``, ``torch.optim.AdamW``); this module only splits the parameters and
presents the two as one ``torch.optim.Optimizer`` so the Trainer's LR scheduler, gradient clipping and checkpoints
(``optimizer.pt``, restored on ``--resume``) see a single optimizer.

One learning rate drives both halves: by default Muon scales its update with ``adjust_lr_fn=match_rms_adamw``
(Moonshot AI, "Muon is Scalable for LLM Training", arXiv 2502.16982: lr * 0.2 * sqrt(max(A, B)), so the update's
RMS matches AdamW's and AdamW's learning rate and weight decay carry over); ``adjust_lr_fn=original`` is Keller
Jordan's sqrt(max(1, A/B)) scaling, which wants a much larger lr (about 0.02). Weight decay: ``weight_decay`` of
the recipe, decoupled, on the Muon matrices and on the AdamW matrices (embeddings, head); none on norms and biases.

``optim_args`` (comma-separated ``key=value``): momentum (0.95), nesterov (true), ns_steps (5),
adjust_lr_fn (match_rms_adamw | original), beta1 (0.9), beta2 (0.999), eps (1e-8, AdamW's).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_NAMES = ("lm_head", "score", "classifier", "v_head", "embed")  # output heads and embeddings by name
ADJUST_LR = ("match_rms_adamw", "original")


def split_for_muon(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon params, AdamW params) as (name, parameter) lists, trainable parameters only.

    Muon: 2-D weights of hidden layers (attention and MLP projections, LoRA A/B matrices of those). AdamW: the
    parameters of every ``nn.Embedding``, of ``model.get_output_embeddings()`` (tied or not), of modules whose name
    marks an output head or embedding (``HEAD_NAMES``, e.g. a reward model's ``score``), and all 1-D parameters.
    """
    not_hidden = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        not_hidden |= {id(p) for p in head.parameters()}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = p.ndim == 2 and id(p) not in not_hidden and not any(part in name for part in HEAD_NAMES)
        (muon if hidden else adamw).append((name, p))
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on ``muon_params`` and ``torch.optim.AdamW`` on the rest, as one optimizer.

    The param groups and the state are shared with the two inner optimizers (same dict objects), so a scheduler
    that sets ``group["lr"]`` and a checkpoint of ``state_dict()`` cover both; ``load_state_dict`` re-links them.
    """

    def __init__(
        self,
        muon_params,
        adamw_decay,
        adamw_no_decay,
        *,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        self._parts = []
        if muon_params:
            self._parts.append(
                torch.optim.Muon(
                    [{"params": list(muon_params), "weight_decay": weight_decay}],
                    lr=lr,
                    momentum=momentum,
                    nesterov=nesterov,
                    ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn,
                )
            )
        groups = [
            {"params": list(ps), "weight_decay": wd}
            for ps, wd in ((adamw_decay, weight_decay), (adamw_no_decay, 0.0))
            if ps
        ]
        if groups:
            self._parts.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps))
        if not self._parts:
            raise ValueError("MuonWithAdamW: no trainable parameters")
        super().__init__([g for opt in self._parts for g in opt.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        start = 0
        for opt in self._parts:
            opt.param_groups = self.param_groups[start : start + len(opt.param_groups)]
            opt.state = self.state
            start += len(opt.param_groups)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: point the inner ones at them
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._parts:
            opt.step()
        return loss


class MuonFactory:
    """What ``OPTIMIZERS["muon"]`` names: transformers' Trainer calls an optimizer factory with the model
    (``Trainer.create_optimizer``: ``factory()(model, **kwargs)``), which the split by parameter name needs."""

    def __call__(self, model: nn.Module, lr: float, weight_decay: float = 0.0, **kwargs) -> MuonWithAdamW:
        muon, adamw = split_for_muon(model)
        return MuonWithAdamW(
            [p for _, p in muon],
            [p for _, p in adamw if p.ndim >= 2],
            [p for _, p in adamw if p.ndim < 2],
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )


def muon_kwargs(optim_args: str | None) -> dict:
    """Parse ``optim_args`` ("momentum=0.9,adjust_lr_fn=original,...") into MuonWithAdamW keyword arguments."""
    parsers = {
        "momentum": float,
        "nesterov": _bool,
        "ns_steps": int,
        "adjust_lr_fn": _adjust_lr,
        "beta1": float,
        "beta2": float,
        "eps": float,
    }
    raw: dict = {}
    for item in (optim_args or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise ValueError(f"muon optim_args: expected key=value, got {item.strip()!r}")
        if key not in parsers:
            raise ValueError(f"muon optim_args: unknown key {key!r}; valid keys: {', '.join(parsers)}")
        try:
            raw[key] = parsers[key](value)
        except ValueError as err:
            raise ValueError(f"muon optim_args: {key}={value!r}: {err}") from None
    kwargs = {k: v for k, v in raw.items() if k not in ("beta1", "beta2")}
    kwargs["betas"] = (raw.get("beta1", 0.9), raw.get("beta2", 0.999))
    if not 0.0 <= kwargs.get("momentum", 0.95) < 1.0 or not all(0.0 <= b < 1.0 for b in kwargs["betas"]):
        raise ValueError("muon optim_args: momentum, beta1 and beta2 must be in [0, 1)")
    if kwargs.get("ns_steps", 5) < 1 or kwargs.get("eps", 1e-8) <= 0:
        raise ValueError("muon optim_args: ns_steps must be >= 1 and eps > 0")
    return kwargs


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")


def _adjust_lr(value: str) -> str:
    if value not in ADJUST_LR:
        raise ValueError(f"expected one of {', '.join(ADJUST_LR)}")
    return value

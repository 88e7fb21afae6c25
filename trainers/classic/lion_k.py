"""Lion-K: the Lion optimizer family with a pluggable convex function K.

Paper: L. Chen, B. Liu, K. Liang, Q. Liu, "Lion Secretly Solves Constrained Optimization: As Lyapunov
Predicts", ICLR 2024, arXiv 2310.05898. No official code was found; this is written from the math.

The paper's update (m tracks the *negative* gradient, K convex with (sub)gradient dK):

    m_{t+1} = b2 m_t - (1 - b2) grad f(x_t)
    x_{t+1} = x_t + lr ( dK(b1 m_t - (1 - b1) grad f(x_t)) - wd x_t )

Here m tracks the gradient itself (the usual optimizer convention). Every dK used here is odd
(dK(-v) = -dK(v)), so flipping the sign of m gives exactly the same iterates:

    u = dK(b1 m + (1 - b1) g)
    x <- x - lr (u + wd x)
    m <- b2 m + (1 - b2) g

Lion-K with weight decay wd > 0 minimises f(x) + (1/wd) K*(wd x), K* the convex conjugate:

    K = "l1"  ||v||_1,        dK = sign(v)          -> Lion itself; box constraint ||x||_inf <= 1/wd
    K = "l2"  ||v||_2,        dK = v / ||v||_2      -> ball ||x||_2 <= 1/wd (norm taken per tensor)
    K = "sq"  ||v||^2 / 2,    dK = v                -> Polyak momentum + decoupled weight decay,
                                                       i.e. ridge: f + (wd/2)||x||^2, no hard constraint
    K = "lp"  ||v||_p,        dK = sign(v)(|v|/||v||_p)^(p-1)
                                                    -> dual-norm ball ||x||_q <= 1/wd, 1/p + 1/q = 1
    K = callable v -> dK(v)                        -> whatever K* that function implies

Phase 1: an infeasible x moves toward the feasible set geometrically (factor ~(1 - lr wd) per step).
Phase 2: once inside it stays inside (up to O(lr)) while a Lyapunov function decreases to a KKT point.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

Tensor = torch.Tensor
KType = str | Callable[[Tensor], Tensor]

VALID_K = ("l1", "l2", "sq", "lp")
# Lion paper defaults (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
DEFAULT_BETAS = (0.9, 0.99)


def _grad_k(v: Tensor, K: KType, p: float | None) -> Tensor:
    """dK(v) for one parameter tensor."""
    if callable(K):
        return K(v)
    if K == "l1":
        return torch.sign(v)
    if K == "sq":
        return v  # v is a fresh tensor (torch.lerp), safe to return as is
    # l2 and lp are norms of the whole tensor; their gradient is 0 at v = 0 (a valid subgradient).
    # Clamping the norm (instead of `if norm == 0`) gives 0 at v = 0 without a host-device sync.
    q = 2.0 if K == "l2" else float(p)
    norm = torch.linalg.vector_norm(v, ord=q).clamp_min(torch.finfo(v.dtype).tiny)
    if K == "l2":
        return v / norm
    # (|v|/||v||)^(p-1) rather than |v|^(p-1)/||v||^(p-1): no overflow for large p.
    return torch.sign(v) * (v.abs() / norm).pow(q - 1.0)


def _check_hparams(lr: float, betas, weight_decay: float, K: KType, p: float | None) -> None:
    if not lr >= 0.0:  # also rejects NaN
        raise ValueError(f"LionK: lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"LionK: betas must be two numbers in [0, 1), got {betas!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"LionK: weight_decay must be >= 0, got {weight_decay!r}")
    if callable(K):
        return
    if K not in VALID_K:
        raise ValueError(f"LionK: unknown K={K!r}; valid: {', '.join(VALID_K)} or a callable v -> dK(v)")
    if K == "lp" and (p is None or not math.isfinite(p) or p < 1.0):
        raise ValueError(f"LionK: K='lp' needs a finite p >= 1, got p={p!r}")


class LionK(torch.optim.Optimizer):
    """Lion-K (see the module docstring). Drop-in ``torch.optim`` optimizer; every param group may
    carry its own ``lr``, ``betas``, ``weight_decay``, ``K`` and ``p`` (``p`` is used by K="lp" only;
    p=1 is l1, p=2 is l2). State per parameter: ``exp_avg`` (the momentum m, tracking +gradient).
    A callable K is stored in ``state_dict()`` as is, so it must be picklable to be saved."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = DEFAULT_BETAS,
        weight_decay: float = 0.0,
        K: KType = "l1",
        p: float | None = None,
    ):
        _check_hparams(lr, betas, weight_decay, K, p)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, K=K, p=p))

    def add_param_group(self, param_group: dict) -> None:
        # Validate groups added later too, not only the constructor's defaults.
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        try:
            _check_hparams(g["lr"], g["betas"], g["weight_decay"], g["K"], g["p"])
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = x.grad
                if g.is_sparse:
                    raise RuntimeError("LionK does not support sparse gradients")
                state = self.state[x]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(x, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                u = _grad_k(torch.lerp(m, g, 1.0 - beta1), group["K"], group["p"])  # b1 m + (1-b1) g
                x.mul_(1.0 - lr * wd).add_(u, alpha=-lr)  # x - lr (u + wd x)
                m.lerp_(g, 1.0 - beta2)  # b2 m + (1-b2) g
        return loss


def lion_k_kwargs(optim_args: str | None) -> dict:
    """Parse a Hugging Face ``TrainingArguments.optim_args`` string into LionK keyword arguments.

    ``"K=l2,beta1=0.9,beta2=0.99,p=3"`` -> ``{"K": "l2", "betas": (0.9, 0.99), "p": 3.0}``.
    lr and weight_decay are not parsed: they come from TrainingArguments itself.
    """
    valid = ("K", "beta1", "beta2", "p")
    raw: dict[str, str] = {}
    for item in (optim_args or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"lion_k optim_args: expected key=value, got {item!r}")
        if key not in valid:
            raise ValueError(f"lion_k optim_args: unknown key {key!r}; valid keys: {', '.join(valid)}")
        raw[key] = value
    try:
        betas = (float(raw.get("beta1", DEFAULT_BETAS[0])), float(raw.get("beta2", DEFAULT_BETAS[1])))
        p = float(raw["p"]) if "p" in raw else None
    except ValueError as e:
        raise ValueError(f"lion_k optim_args: not a number in {optim_args!r}") from e
    K = raw.get("K", "l1").lower()
    _check_hparams(0.0, betas, 0.0, K, p)
    kwargs: dict = {"K": K, "betas": betas}
    if p is not None:
        kwargs["p"] = p
    return kwargs


def constraint_stats(optimizer: LionK) -> dict:
    """Cheap diagnostics of the hidden constraint ||x||_{K*} <= 1/wd.

    ``max_constraint``: max over tensors of wd * (dual norm of x); <= 1 (+O(lr wd)) means feasible.
    ``frac_at_bound``: fraction of constrained units within one step (lr) of the bound: coordinates
    for l1, whole tensors for l2/lp. Groups with wd = 0, K = "sq" or a callable K are skipped.
    """
    worst, at_bound, total = 0.0, 0, 0
    with torch.no_grad():
        for group in optimizer.param_groups:
            K, wd, lr = group["K"], group["weight_decay"], group["lr"]
            if wd <= 0 or callable(K) or K == "sq":
                continue
            for x in group["params"]:
                if K == "l1":
                    a = x.detach().abs()
                    worst = max(worst, wd * a.max().item()) if a.numel() else worst
                    at_bound += int((a >= 1.0 / wd - lr).sum().item())
                    total += a.numel()
                    continue
                q = 2.0 if K == "l2" else (math.inf if group["p"] == 1 else group["p"] / (group["p"] - 1))
                n = torch.linalg.vector_norm(x.detach(), ord=q).item()
                worst = max(worst, wd * n)
                at_bound += int(n >= 1.0 / wd - lr)
                total += 1
    return {"max_constraint": worst, "frac_at_bound": at_bound / total if total else 0.0}

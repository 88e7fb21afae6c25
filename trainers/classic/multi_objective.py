"""Multi-objective gradient weighting: per-objective gradients and the EPO-style linear programs that pick the
weights alpha on the simplex of a descent direction d = G^T alpha.

Written from the math of EPO search (D. Mahapatra, V. Rajan, "Multi-Task Learning with User Preferences: Gradient
Descent with Controlled Ascent in Pareto Optimization", ICML 2020) as ParetoDA uses it (F. Lv et al., "Pareto Domain
Adaptation", NeurIPS 2021, Sec. 3.3: the target-guided direction; their ``tools/epo_lp_dna.py`` solves the same LPs
with cvxpy + GLPK; here ``scipy.optimize.linprog`` with HiGHS). For m objectives with gradients G (m x P) with
respect to the shared parameters and a guide gradient g_val (the gradient of a held-out loss):

- C = G G^T (the objectives' gradient inner products), c = G g_val (each objective's alignment with the guide).
- Guided ("balance") LP, used while the held-out loss L_val > eps:
  max_alpha alpha^T c  s.t. alpha >= 0, sum alpha = 1, (C alpha)_j >= rhs_j,
  rhs_j = -inf for the objectives already aligned with the guide (c_j > 0), except 0 for the best-aligned one
  (argmax c), and rhs_j = c_j for the others; rhs = 0 when none is aligned.
- Dominance LP, otherwise: max_alpha 1^T C alpha  s.t. alpha on the simplex, C alpha >= 0 (d descends every
  objective to first order), alpha^T c >= min(max c, 0) (d does not turn against the guide).

C and c are divided by one common scale (max |C|) before the LP: the constraints are homogeneous in (C, c), so the
solution is unchanged and HiGHS never sees 1e-9-sized coefficients. If HiGHS reports failure (infeasible or
unbounded: C alpha >= 0 has no solution when two gradients point exactly against each other), the caller's fixed
preference is used and the failure is counted.

``EPOWeighting`` wraps this for any module: given the list of losses, the shared parameters and the held-out loss,
it returns the weighted loss m * sum_j alpha_j L_j (ParetoDA's scaling) and the LP's record; a multi-loss LLM
training step (e.g. SFT + KL + an auxiliary loss) can use it on the model's parameters as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog


def objective_gradients(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """G (m x P): row j is the flattened gradient of losses[j] w.r.t. ``params`` (zeros where a parameter is
    unused). The graph is kept, so the losses can still be backpropagated afterwards."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


@dataclass
class LPResult:
    alpha: np.ndarray  # the weights on the simplex (the fallback preference when the LP failed)
    move: str  # "guided" (balance LP) or "dominance"
    success: bool  # False: HiGHS failed and alpha is the fallback


def guided_lp_rhs(c: np.ndarray) -> np.ndarray:
    """The balance LP's right-hand side: -inf for aligned objectives (c_j > 0) but 0 for the best-aligned one, c_j for
    the rest; all 0 when none is aligned."""
    aligned = c > 0
    if not aligned.any():
        return np.zeros_like(c)
    rhs = c.astype(float).copy()
    rhs[aligned] = -np.inf
    rhs[c == c.max()] = 0.0
    return rhs


def _simplex_lp(objective: np.ndarray, A_ge: np.ndarray, b_ge: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """max objective^T alpha s.t. A_ge alpha >= b_ge (rows with b = -inf dropped), alpha >= 0, sum alpha = 1."""
    m = len(objective)
    keep = np.isfinite(b_ge)
    res = linprog(
        -objective,
        A_ub=-A_ge[keep] if keep.any() else None,
        b_ub=-b_ge[keep] if keep.any() else None,
        A_eq=np.ones((1, m)),
        b_eq=np.ones(1),
        bounds=[(0, None)] * m,
        method="highs",
    )
    if res.status != 0 or res.x is None:
        return None, False
    alpha = np.clip(res.x, 0.0, None)
    return alpha / alpha.sum(), True


def target_guided_alpha(
    G: np.ndarray, g_val: np.ndarray, loss_val: float, eps: float = 1e-3, preference: np.ndarray | None = None
) -> LPResult:
    """The weights alpha of ParetoDA's target-guided direction (see the module docstring): the guided LP while
    ``loss_val > eps``, the dominance LP otherwise; ``preference`` (default uniform) when HiGHS fails."""
    G = np.asarray(G, dtype=np.float64)
    m = G.shape[0]
    C = G @ G.T
    c = G @ np.asarray(g_val, dtype=np.float64)
    scale = float(np.abs(C).max())
    if scale > 0 and np.isfinite(scale):
        C, c = C / scale, c / scale
    if loss_val > eps:
        move = "guided"
        alpha, ok = _simplex_lp(c, C, guided_lp_rhs(c))
    else:
        move = "dominance"
        A = np.vstack([C, c[None, :]])
        b = np.concatenate([np.zeros(m), [min(float(c.max()), 0.0)]])
        alpha, ok = _simplex_lp(C.sum(axis=0), A, b)
    if not ok:
        alpha = np.full(m, 1.0 / m) if preference is None else np.asarray(preference, dtype=np.float64)
    return LPResult(alpha, move, ok)


class EPOWeighting:
    """Target-guided multi-objective weighting of m losses on shared parameters, one LP per step.

    ``loss, result = weighting(losses, params, guide_loss)``: ``loss`` = m * sum_j alpha_j L_j (backpropagate it as
    the shared parameters' loss); ``guide_loss`` is the held-out loss whose gradient steers the direction. Counts
    the LP failures (``failures``), the steps (``steps``) and the dominance steps whose direction G^T alpha ascends
    some objective to first order, (G G^T alpha)_j < -1e-6 max |G G^T| (``ascents``; 0 while the LP does its job:
    its constraint is G G^T alpha >= 0; the fixed-preference fallback is not counted).
    """

    def __init__(self, m: int, eps: float = 1e-3, preference: list[float] | None = None):
        if m < 2:
            raise ValueError(f"EPOWeighting needs at least 2 objectives, got {m}")
        self.m, self.eps = m, eps
        self.preference = np.full(m, 1.0 / m) if preference is None else np.asarray(preference, dtype=np.float64)
        if self.preference.shape != (m,) or (self.preference < 0).any() or abs(self.preference.sum() - 1) > 1e-9:
            raise ValueError(f"preference must be {m} non-negative numbers summing to 1, got {preference!r}")
        self.steps = self.failures = self.ascents = 0

    def __call__(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], guide_loss: torch.Tensor
    ) -> tuple[torch.Tensor, LPResult]:
        if len(losses) != self.m:
            raise ValueError(f"EPOWeighting was built for {self.m} losses, got {len(losses)}")
        G = objective_gradients(losses, params)
        (g_val,) = objective_gradients([guide_loss], params)
        result = target_guided_alpha(
            G.detach().double().cpu().numpy(),
            g_val.detach().double().cpu().numpy(),
            float(guide_loss.detach()),
            self.eps,
            self.preference,
        )
        self.steps += 1
        self.failures += not result.success
        if result.success and result.move == "dominance":
            C = (G @ G.T).detach().double().cpu().numpy()
            self.ascents += bool((C @ result.alpha).min() < -1e-6 * np.abs(C).max())
        alpha = torch.as_tensor(result.alpha, dtype=losses[0].dtype, device=losses[0].device)
        return self.m * (alpha * torch.stack(losses)).sum(), result

    def state_dict(self) -> dict:
        return {"steps": self.steps, "failures": self.failures, "ascents": self.ascents}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.failures = int(state["steps"]), int(state["failures"])
        self.ascents = int(state.get("ascents", 0))

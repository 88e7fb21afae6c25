"""Privacy accounting under zero-concentrated differential privacy (zCDP), and its conversion to (eps, delta)-DP.

Definitions and the facts used, each with its source:

* rho-zCDP (Bun and Steinke, "Concentrated Differential Privacy: Simplifications, Extensions, and Lower Bounds",
  arXiv 1605.02065): D_alpha(M(x) || M(x')) <= rho * alpha for every alpha > 1 and neighbouring x, x'.
* Gaussian mechanism (their Prop. 1.6): adding N(0, sigma^2) to every coordinate of a query with L2 sensitivity
  Delta is rho-zCDP with rho = Delta^2 / (2 sigma^2); so sigma = Delta / sqrt(2 rho).
* Composition (their Lemma 1.7): the rhos of adaptively composed mechanisms add.
* Exponential mechanism / report-noisy-max with Gumbel noise at epsilon-DP is epsilon^2 / 8-zCDP (Cesar and Rogers,
  "Bounding, Concentrating, and Truncating: Unifying Privacy Loss Composition for Data Analytics", arXiv
  2004.07223, Lemma 3.2 with the bounded-range property of the exponential mechanism).
* zCDP -> (eps, delta)-DP, the tight conversion of Canonne, Kamath and Steinke, "The Discrete Gaussian for
  Differential Privacy", arXiv 2004.00010, Prop. 12 (Corollary 13):
  delta(eps) = inf_{alpha > 1} exp((alpha - 1)(alpha rho - eps)) / (alpha - 1) * (1 - 1/alpha)^alpha.
  The log of the bracket is convex in alpha with derivative (2 alpha - 1) rho - eps + log(1 - 1/alpha), so the
  infimum sits at the root of that derivative. The simpler bound eps = rho + 2 sqrt(rho log(1/delta))
  (Bun and Steinke, Prop. 1.3) is looser; ``zcdp_eps_simple`` gives it for comparison.

This is the accounting Private-GSD (arXiv 2306.03257) and its predecessors RAP / RAP++ / MST use: a budget given as
(eps, delta) is turned into the largest rho whose conversion meets it (``rho_for_eps_delta``), split over Gaussian
measurements (and exponential-mechanism selections in the adaptive mode), and the spent total is reported back as
(eps, delta). The root finding uses scipy's brentq rather than a hand-written bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy.optimize import brentq


def gaussian_sigma(rho: float, l2_sensitivity: float) -> float:
    """Noise scale of the Gaussian mechanism that is ``rho``-zCDP for a query of L2 sensitivity ``l2_sensitivity``."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    return l2_sensitivity / math.sqrt(2.0 * rho)


def gaussian_rho(sigma: float, l2_sensitivity: float) -> float:
    """The zCDP parameter of the Gaussian mechanism with noise scale ``sigma``: Delta^2 / (2 sigma^2)."""
    return l2_sensitivity**2 / (2.0 * sigma**2)


def exponential_mechanism_rho(epsilon: float) -> float:
    """The zCDP parameter of an epsilon-DP exponential mechanism (or Gumbel report-noisy-max): epsilon^2 / 8."""
    return epsilon**2 / 8.0


def exponential_mechanism_epsilon(rho: float) -> float:
    """The epsilon of an exponential mechanism that spends exactly ``rho`` zCDP: sqrt(8 rho)."""
    return math.sqrt(8.0 * rho)


def _log_delta_at(alpha: float, rho: float, eps: float) -> float:
    return (alpha - 1.0) * (alpha * rho - eps) + alpha * math.log1p(-1.0 / alpha) - math.log(alpha - 1.0)


def optimal_alpha(rho: float, eps: float) -> float:
    """The Renyi order alpha > 1 that minimises the Canonne-Kamath-Steinke bound (root of its log-derivative)."""
    derivative = lambda a: (2.0 * a - 1.0) * rho - eps + math.log1p(-1.0 / a)  # noqa: E731 (increasing in a)
    low, high = 1.0 + 1e-12, max(2.0, (eps + 1.0) / (2.0 * rho) + 2.0)
    if derivative(low) >= 0:  # only when eps is tiny next to rho: the bound is then near 1 anyway
        return low
    while derivative(high) < 0:
        high *= 2.0
    return brentq(derivative, low, high, xtol=1e-14, rtol=1e-15, maxiter=500)


def zcdp_delta(rho: float, eps: float) -> float:
    """The smallest delta such that rho-zCDP implies (eps, delta)-DP (Canonne-Kamath-Steinke Prop. 12); <= 1."""
    if rho < 0 or eps < 0:
        raise ValueError(f"rho and eps must be >= 0, got rho={rho}, eps={eps}")
    if rho == 0:
        return 0.0
    return min(1.0, math.exp(_log_delta_at(optimal_alpha(rho, eps), rho, eps)))


def zcdp_eps(rho: float, delta: float) -> float:
    """The smallest eps such that rho-zCDP implies (eps, delta)-DP (inverse of ``zcdp_delta`` in eps)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rho == 0:
        return 0.0
    high = zcdp_eps_simple(rho, delta)  # a valid eps, so delta(high) <= delta
    if zcdp_delta(rho, 0.0) <= delta:
        return 0.0
    return brentq(lambda e: zcdp_delta(rho, e) - delta, 0.0, high, xtol=1e-13, rtol=1e-15, maxiter=500)


def zcdp_eps_simple(rho: float, delta: float) -> float:
    """The classical (looser) conversion of Bun and Steinke Prop. 1.3: eps = rho + 2 sqrt(rho log(1/delta))."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rho_for_eps_delta(eps: float, delta: float) -> float:
    """The largest rho whose rho-zCDP guarantee implies (eps, delta)-DP (the budget a (eps, delta) target allows)."""
    if not eps > 0 or not 0 < delta < 1:
        raise ValueError(f"need eps > 0 and 0 < delta < 1, got eps={eps}, delta={delta}")
    high = eps + 1.0
    while zcdp_delta(high, eps) <= delta:
        high *= 2.0
    return brentq(lambda r: zcdp_delta(r, eps) - delta, 1e-300, high, xtol=1e-15, rtol=1e-14, maxiter=500)


@dataclass
class ZCDPAccountant:
    """A ledger of zCDP spends against a budget ``rho``. ``spend`` refuses to go over budget (beyond float
    round-off), so a mechanism that would break the guarantee fails before it touches the data."""

    budget: float
    ledger: list = field(default_factory=list)  # [(what, rho)], in the order spent

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"the zCDP budget must be > 0, got {self.budget}")

    @property
    def spent(self) -> float:
        return math.fsum(r for _, r in self.ledger)

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.spent)

    def spend(self, rho: float, what: str) -> float:
        if not rho > 0:
            raise ValueError(f"{what}: a spend must be > 0, got {rho}")
        if self.spent + rho > self.budget * (1 + 1e-9):
            raise ValueError(
                f"{what}: spending rho={rho:.6g} would exceed the zCDP budget ({self.spent:.6g} of {self.budget:.6g} "
                "spent)"
            )
        self.ledger.append((what, float(rho)))
        return rho

    def report(self, delta: float) -> dict:
        """Budget, spent rho, the (eps, delta) it implies (tight and classical conversions) and the spends by kind."""
        kinds: dict[str, float] = {}
        for what, rho in self.ledger:
            kind = what.split(":")[0]
            kinds[kind] = kinds.get(kind, 0.0) + rho
        spent = self.spent
        return {
            "rho_budget": self.budget,
            "rho_spent": spent,
            "delta": delta,
            "epsilon": zcdp_eps(spent, delta) if spent > 0 else 0.0,
            "epsilon_simple_bound": zcdp_eps_simple(spent, delta),
            "mechanisms": len(self.ledger),
            "rho_by_kind": kinds,
        }

    def state_dict(self) -> dict:
        return {"budget": self.budget, "ledger": [list(x) for x in self.ledger]}

    @classmethod
    def from_state(cls, state: dict) -> "ZCDPAccountant":
        return cls(state["budget"], [tuple(x) for x in state["ledger"]])

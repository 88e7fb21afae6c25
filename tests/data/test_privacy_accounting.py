"""zCDP accounting against independent computations: the Gaussian sigma formula, composition, and the zCDP ->
(eps, delta) conversion checked against a brute-force grid over the Renyi order, the classical bound, and the exact
privacy profile of the Gaussian mechanism (Balle and Wang 2018), which any valid conversion must upper-bound."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from posttrain.data.privacy_accounting import (
    ZCDPAccountant,
    exponential_mechanism_epsilon,
    exponential_mechanism_rho,
    gaussian_rho,
    gaussian_sigma,
    rho_for_eps_delta,
    zcdp_delta,
    zcdp_eps,
    zcdp_eps_simple,
)


def grid_delta(rho: float, eps: float) -> float:
    """inf over a dense log-spaced grid of alpha of exp((a-1)(a rho - eps)) / (a-1) * (1 - 1/a)^a (no root finding)."""
    a = 1.0 + np.logspace(-7, 5, 400_001)
    log = (a - 1) * (a * rho - eps) + a * np.log1p(-1 / a) - np.log(a - 1)
    return float(min(1.0, np.exp(log.min())))


def gaussian_exact_delta(sigma: float, sens: float, eps: float) -> float:
    """The exact (eps, delta) curve of the Gaussian mechanism (Balle and Wang, ICML 2018, Theorem 8)."""
    a, b = sens / (2 * sigma), eps * sigma / sens
    return float(norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b))


@pytest.mark.parametrize("rho", [0.005, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.3, 1.0, 3.0, 8.0])
def test_conversion_matches_a_brute_force_grid(rho, eps):
    ours, grid = zcdp_delta(rho, eps), grid_delta(rho, eps)
    assert ours <= grid * (1 + 1e-9) + 1e-300  # the root is the true infimum: never above a grid point
    assert ours == pytest.approx(grid, rel=1e-4, abs=1e-300)


@pytest.mark.parametrize("rho", [0.01, 0.5, 3.0])
def test_conversion_bounds_the_exact_gaussian_profile(rho):
    sigma = gaussian_sigma(rho, 1.0)
    for eps in (0.1, 0.5, 1.0, 2.0, 5.0):
        exact = gaussian_exact_delta(sigma, 1.0, eps)
        assert exact <= zcdp_delta(rho, eps) + 1e-15
        # and it is not vacuous: within a factor of a few of the exact curve where delta is small
        if exact > 1e-12:
            assert zcdp_delta(rho, eps) <= 10 * exact


def test_eps_inverts_delta_and_beats_the_classical_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rho, delta = 10 ** rng.uniform(-3, 1), 10 ** rng.uniform(-9, -3)
        eps = zcdp_eps(rho, delta)
        assert zcdp_delta(rho, eps) == pytest.approx(delta, rel=1e-6)
        assert eps < zcdp_eps_simple(rho, delta)
        assert zcdp_eps_simple(rho, delta) == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1 / delta)))
        # the rho a (eps, delta) target allows gives back that eps
        assert zcdp_eps(rho_for_eps_delta(eps, delta), delta) == pytest.approx(eps, rel=1e-6)


def test_worked_example_rho_half():
    # rho = 0.5 at delta = 1e-5: the grid gives the same eps; the classical bound is about 5.30
    eps = zcdp_eps(0.5, 1e-5)
    assert grid_delta(0.5, eps) == pytest.approx(1e-5, rel=1e-4)
    assert zcdp_eps_simple(0.5, 1e-5) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e5)), rel=1e-12)
    assert 4.0 < eps < zcdp_eps_simple(0.5, 1e-5)


def test_gaussian_sigma_and_exponential_mechanism():
    assert gaussian_sigma(0.5, 1.0) == pytest.approx(1.0)
    assert gaussian_sigma(0.5 / 15, 1 / 3000) == pytest.approx(
        math.sqrt(15 / (2 * 0.5)) / 3000
    )  # one marginal cell's sigma at rho 0.5 over 15 marginals, n = 3000
    for rho, sens in ((0.1, 2.0), (3.0, 0.01)):
        assert gaussian_rho(gaussian_sigma(rho, sens), sens) == pytest.approx(rho)
    assert exponential_mechanism_rho(exponential_mechanism_epsilon(0.02)) == pytest.approx(0.02)
    assert exponential_mechanism_rho(1.0) == 1 / 8


def test_accountant_composes_and_refuses_overspending():
    acc = ZCDPAccountant(0.5)
    for i in range(15):
        acc.spend(0.5 / 15, f"gaussian:workload {i}")
    assert acc.spent == pytest.approx(0.5, rel=1e-12) and acc.remaining == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="exceed the zCDP budget"):
        acc.spend(1e-6, "gaussian:one more")
    report = acc.report(1e-5)
    assert report["rho_spent"] == pytest.approx(0.5) and report["mechanisms"] == 15
    assert report["epsilon"] == pytest.approx(zcdp_eps(0.5, 1e-5))
    assert ZCDPAccountant.from_state(acc.state_dict()).spent == acc.spent

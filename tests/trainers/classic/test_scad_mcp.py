"""SCAD / MCP penalised regression (K. Yang's thesis, arXiv 2009.10629): penalties and proximal maps on worked
examples and against brute force, coordinate descent's stationarity, and the experiment: n = 200, p = 500, s = 10
coefficients of +-1, AR(1) correlation 0.3, lambda chosen on a validation split, seeds 0-2, both penalties.

Pass criteria (each seed): support F1 >= 0.9 at the chosen lambda; AG reaches F - f* <= 1e-6 (f* from a long
coordinate-descent run) in fewer iterations than ISTA. AG uses beta_k = 1/L; with Ghadimi & Lan's 1/(2L) it needs
about twice ISTA's iterations (EXPERIMENTS.md), so that part of the claim holds only at the larger step.
"""

import json

import numpy as np
import pytest

from posttrain.trainers.classic.scad_mcp import (
    ISTA,
    AcceleratedGradient,
    Penalty,
    ScadMCPConfig,
    ScadMCPTrainer,
    coordinate_descent,
    gradient,
    iterations_to_gap,
    lambda_max,
    mcp_derivative,
    mcp_penalty,
    objective,
    prox_mcp,
    prox_scad,
    scad_derivative,
    scad_penalty,
    support_f1,
)


def test_penalties_by_hand():
    # SCAD, lambda = 1, a = 3.7: linear, quadratic blend (2*3.7*2 - 4 - 1) / 5.4, constant 4.7 / 2
    np.testing.assert_allclose(scad_penalty(np.array([0.5, -2.0, 5.0]), 1.0, 3.7), [0.5, 9.8 / 5.4, 2.35])
    np.testing.assert_allclose(scad_derivative(np.array([0.5, 2.0, 5.0]), 1.0, 3.7), [1.0, 1.7 / 2.7, 0.0])
    # MCP, lambda = 1, gamma = 3: t - t^2 / 6 up to 3, then 1.5
    np.testing.assert_allclose(mcp_penalty(np.array([1.0, -4.0]), 1.0, 3.0), [1 - 1 / 6, 1.5])
    np.testing.assert_allclose(mcp_derivative(np.array([1.0, 4.0]), 1.0, 3.0), [2 / 3, 0.0])


@pytest.mark.parametrize("kind", ["scad", "mcp"])
def test_derivatives_match_finite_differences(kind):
    t = np.linspace(0.01, 6, 600)
    t = t[np.abs(t - 0.7) > 1e-3]  # avoid the kinks at lambda, a lambda, gamma lambda
    value, deriv = (scad_penalty, scad_derivative) if kind == "scad" else (mcp_penalty, mcp_derivative)
    shape = 3.7 if kind == "scad" else 3.0
    numeric = (value(t + 1e-6, 0.7, shape) - value(t - 1e-6, 0.7, shape)) / 2e-6
    np.testing.assert_allclose(deriv(t, 0.7, shape), numeric, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["scad", "mcp"])
@pytest.mark.parametrize("eta", [0.3, 1.0, 1.9])
def test_prox_is_the_brute_force_argmin(kind, eta):
    rng = np.random.default_rng(0)
    pen = Penalty(kind, 0.8)
    grid = np.linspace(-8, 8, 160001)
    for z in np.concatenate([rng.uniform(-5, 5, 20), [0.0, 0.8, 0.8 * (1 + eta), 2.96, 2.4]]):
        brute = grid[np.argmin((grid - z) ** 2 / (2 * eta) + _values(pen, grid))]
        assert float(pen.prox(np.array(z), eta)) == pytest.approx(brute, abs=2e-4), (kind, eta, z)


def _values(pen, grid):
    return scad_penalty(grid, pen.lambd, pen.a) if pen.kind == "scad" else mcp_penalty(grid, pen.lambd, pen.gamma)


def test_prox_refuses_a_step_without_a_closed_form():
    with pytest.raises(ValueError, match="eta < a - 1"):
        prox_scad(np.array(1.0), 1.0, 3.7, 2.7)
    with pytest.raises(ValueError, match="eta < gamma"):
        prox_mcp(np.array(1.0), 1.0, 3.0, 3.0)


def _problem(seed=0):
    t = ScadMCPTrainer(ScadMCPConfig(seed=seed, p=60, n=40, s=4, lambd=0.2))
    return t.X, t.y


@pytest.mark.parametrize("kind", ["scad", "mcp"])
def test_coordinate_descent_finds_a_stationary_point(kind):
    X, y = _problem()
    pen = Penalty(kind, 0.2)
    beta = coordinate_descent(X, y, pen, np.zeros(X.shape[1]), tol=1e-14)
    eta = 0.5 / (np.linalg.norm(X, 2) ** 2 / len(y))
    np.testing.assert_allclose(pen.prox(beta - eta * gradient(X, y, beta), eta), beta, rtol=0, atol=1e-9)
    assert lambda_max(X, y) > 0.2 and (beta != 0).any()
    assert np.all(coordinate_descent(X, y, Penalty(kind, lambda_max(X, y) * 1.001), np.zeros(X.shape[1])) == 0)


def test_support_f1():
    assert support_f1(np.array([1.0, 0, 2, 0]), np.array([1.0, 1, 0, 0])) == pytest.approx(0.5)
    assert support_f1(np.zeros(3), np.array([1.0, 0, 0])) == 0.0


@pytest.fixture(scope="module")
def experiment():
    out = {}
    for kind in ("scad", "mcp"):
        for seed in (0, 1, 2):
            t = ScadMCPTrainer(ScadMCPConfig(penalty=kind, seed=seed))
            start = np.zeros(t.X.shape[1])
            solvers = {"ag": AcceleratedGradient(t.X, t.y, t.pen, start), "ista": ISTA(t.X, t.y, t.pen, start)}
            row = {name: iterations_to_gap(s, t.X, t.y, t.pen, t.f_star, 1e-6, 2000) for name, s in solvers.items()}
            row["f1"] = support_f1(t.full_beta(solvers["ag"].beta), t.beta_true)
            row["gap_ag"] = objective(t.X, t.y, solvers["ag"].beta, t.pen) - t.f_star
            out[kind, seed] = row
    return out


def test_support_is_recovered_at_the_validation_lambda(experiment):
    assert all(r["f1"] >= 0.9 for r in experiment.values()), experiment
    assert all(r["gap_ag"] >= -1e-9 for r in experiment.values()), experiment  # f* is the same local minimum


def test_accelerated_gradient_needs_fewer_iterations_than_ista(experiment):
    assert all(r["ag"] < r["ista"] <= 2000 for r in experiment.values()), experiment


def test_mi_screening_then_scad(tmp_path):
    """The data stage inside the trainer: n / log n columns survive, the fit lives on them, metrics in full space."""
    t = ScadMCPTrainer(ScadMCPConfig(screen="mi", p=1000, max_steps=2000, stop_gap=1e-8, output_dir=str(tmp_path)))
    final = t.train(verbose=False)
    true = np.flatnonzero(t.beta_true)
    assert t.X.shape[1] == 37 and final["screen/kept"] == 37  # n / log n
    assert final["screen/true_kept"] == int(np.isin(true, t.cols).sum()) >= 5, final
    fitted = np.flatnonzero(t.full_beta(t.solver.beta))
    assert set(fitted) <= set(t.cols.tolist()) and final["stopped_by"] == "criterion" and final["gap"] <= 1e-8
    assert final["support_f1"] == pytest.approx(support_f1(t.full_beta(t.solver.beta), t.beta_true))


def test_resume_through_the_cli_continues_the_same_run(tmp_path):
    from posttrain.cli import main
    from posttrain.recipes.config import load_recipe

    over = ["--max_steps", "40", "--stop_gap", "0", "--eval_every", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "scad_mcp/scad_ag", *over, "--output_dir", str(full)]) == 0
    values = {"max_steps": 40, "stop_gap": 0.0, "eval_every": 5, "output_dir": str(part)}
    half = ScadMCPTrainer(load_recipe("scad_mcp/scad_ag", values).config)
    for _ in range(20):
        half.step()
    half.save()
    assert main(["train", "scad_mcp/scad_ag", *over, "--output_dir", str(part), "--resume"]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["final"]["gap"] == b["final"]["gap"] and a["history"][4:] == b["history"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(penalty="lasso"), "penalty"),
        (dict(solver="cd"), "solver"),
        (dict(a=2.0), "a must"),
        (dict(gamma=1.0), "gamma must"),
        (dict(s=600), "s \\(600\\)"),
        (dict(rho=1.0), "rho"),
        (dict(ag_step=1.5), "ag_step"),
        (dict(screen="lasso"), "screen must"),
        (dict(screen="mi", screen_bandwidth="isj"), "screen bandwidth"),
    ],
)
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ScadMCPConfig(**bad)

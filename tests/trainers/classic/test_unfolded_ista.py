"""Deep-unfolded ISTA / IHT (Nagahisa, Hayakawa, Iiguni, arXiv 2509.01331): the thresholds and objectives on worked
examples, the unfolded network against a plain loop, and the experiment's pass criteria (m = 50, n = 100, p = 0.1,
sigma = 0.01, lambda = 0.05, T = 20, 500 Adam steps of 100 fresh samples, 1000 test samples, 3 seeds, majority):

- ISTA: J_1(unsup) <= 1.10 J_1(LASSO*) and J_1(unsup) < J_1(ISTA-20); NMSE(sup) < NMSE(unsup) and J_1(sup) > J_1(unsup);
- IHT: both DU-IHT variants reach a lower J_0 than IHT-20.
"""

import functools
import json
import math
import tempfile

import pytest
import torch

from posttrain.trainers.classic.unfolded_ista import (
    UnfoldedISTAConfig,
    UnfoldedISTATrainer,
    fista_lasso,
    hard_threshold,
    l0_objective,
    lasso_objective,
    nmse_db,
    soft_threshold,
    unfolded_forward,
)

torch.set_num_threads(1)
SEEDS = (0, 1, 2)


def test_thresholds_and_objectives_by_hand():
    v = torch.tensor([-2.0, -0.3, 0.0, 0.5, 1.5])
    assert soft_threshold(v, 0.5).tolist() == [-1.5, 0.0, 0.0, 0.0, 1.0]
    assert hard_threshold(v, 0.5).tolist() == [-2.0, 0.0, 0.0, 0.0, 1.5]  # |0.5| is not > 0.5
    A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    y, x = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.0]])
    # residual y - A x = (0.5, 1): 1/2 (0.25 + 1) = 0.625; lambda = 0.1: + 0.05 (l1) or + 0.1 (l0)
    assert lasso_objective(A, y, x, 0.1).item() == pytest.approx(0.675)
    assert l0_objective(A, y, x, 0.1).item() == pytest.approx(0.725)
    assert nmse_db(torch.tensor([[1.1, 0.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(-20.0)


def test_unfolded_layers_are_plain_ista_and_iht_steps():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 9, generator=g, dtype=torch.float64)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    gammas = torch.rand(5, generator=g, dtype=torch.float64) * 0.05
    for algo in ("ista", "iht"):
        x = torch.zeros(4, 9, dtype=torch.float64)
        for gamma in gammas.tolist():  # the textbook iteration, one sample at a time
            rows = []
            for xi, yi in zip(x, y):
                v = xi + gamma * A.T @ (yi - A @ xi)
                tau = 0.3 * gamma if algo == "ista" else math.sqrt(2 * 0.3 * gamma)
                rows.append(torch.sign(v) * (v.abs() - tau).clamp_min(0) if algo == "ista" else v * (v.abs() > tau))
            x = torch.stack(rows)
        torch.testing.assert_close(unfolded_forward(A, y, gammas, 0.3, algo), x, rtol=0, atol=1e-12)
        # a variant axis: each row of gammas is its own network
        both = unfolded_forward(A, y, torch.stack([gammas, gammas.flip(0)]), 0.3, algo)
        torch.testing.assert_close(both[0], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(both[1], unfolded_forward(A, y, gammas.flip(0), 0.3, algo), rtol=0, atol=1e-12)


def test_fista_reaches_the_lasso_optimality_conditions():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(20, 40, generator=g, dtype=torch.float64) / math.sqrt(20)
    y = torch.randn(3, 20, generator=g, dtype=torch.float64)
    x = fista_lasso(A, y, 0.1, 20000, tol=1e-12)
    corr = (y - x @ A.T) @ A  # A^T (y - A x): = lambda sign(x) on the support, |.| <= lambda off it
    on = x != 0
    assert on.any()
    torch.testing.assert_close(corr[on], 0.1 * torch.sign(x[on]), rtol=0, atol=1e-8)
    assert corr[~on].abs().max() <= 0.1 + 1e-8


@pytest.mark.parametrize("algo", ["ista", "iht"])
def test_training_losses_are_the_squared_error_and_the_objective(algo, tmp_path):
    t = UnfoldedISTATrainer(UnfoldedISTAConfig(algo=algo, test_samples=5, reference_iters=5, output_dir=str(tmp_path)))
    g = torch.Generator().manual_seed(3)
    x, x_hat = torch.randn(4, 100, generator=g), torch.randn(2, 4, 100, generator=g)
    x_hat[x_hat.abs() < 0.5] = 0  # some exact zeros for the l0 count
    y = torch.randn(4, 50, generator=g)
    A = t.A32.double()
    sup = sum(float(((x_hat[0, i] - x[i]) ** 2).sum()) for i in range(4)) / 4
    unsup = 0.0
    for i in range(4):
        r = y[i].double() - A @ x_hat[1, i].double()
        pen = x_hat[1, i].abs().sum() if algo == "ista" else (x_hat[1, i] != 0).sum()
        unsup += (0.5 * float(r @ r) + 0.05 * float(pen)) / 4
    assert t.variants == ["sup", "unsup"]
    assert float(t.loss(x_hat, x, y)) == pytest.approx(sup + unsup, rel=1e-5)


@functools.cache
def _runs(algo: str) -> dict:
    """The experiment for one algorithm and 3 seeds (sup and unsup trained side by side on the same data);
    computed once per session and shared by the tests of that algorithm."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in SEEDS:
            args = UnfoldedISTAConfig(algo=algo, seed=seed, eval_every=500, output_dir=f"{folder}/{seed}")
            out[seed] = UnfoldedISTATrainer(args).train(verbose=False)
    return out


def _majority(checks):
    return sum(checks) >= 2


def test_unsupervised_du_ista_approaches_the_lasso_optimum():
    r = [_runs("ista")[s] for s in SEEDS]
    assert _majority([x["J/unsup"] <= 1.10 * x["J/ista_ref"] for x in r]), r
    assert _majority([x["J/unsup"] < x["J/ista_T"] for x in r]), r


def test_supervised_du_ista_wins_nmse_but_not_the_objective():
    r = [_runs("ista")[s] for s in SEEDS]
    assert _majority([x["nmse_db/sup"] < x["nmse_db/unsup"] for x in r]), r
    assert _majority([x["J/sup"] > x["J/unsup"] for x in r]), r
    assert all(x["nmse_db/sup"] < x["nmse_db/ista_T"] for x in r), r  # both learn: far below ISTA-20's NMSE


def test_both_du_iht_variants_beat_plain_iht_on_the_l0_objective():
    r = [_runs("iht")[s] for s in SEEDS]
    assert _majority([x["J/sup"] < x["J/iht_T"] for x in r]), r
    assert _majority([x["J/unsup"] < x["J/iht_T"] for x in r]), r


def test_resume_through_the_cli_continues_the_same_run(tmp_path):
    from posttrain.cli import main
    from posttrain.recipes.config import load_recipe

    over = ["--max_steps", "20", "--eval_every", "5", "--test_samples", "50", "--reference_iters", "50"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "unfolded_ista/ista_sup_unsup", *over, "--output_dir", str(full)]) == 0
    values = {k.lstrip("-"): v for k, v in zip(over[::2], over[1::2])}
    config = load_recipe("unfolded_ista/ista_sup_unsup", {**values, "output_dir": str(part)}).config
    half = UnfoldedISTATrainer(config)
    for _ in range(10):
        half.step()
    half.save()
    assert main(["train", "unfolded_ista/ista_sup_unsup", *over, "--output_dir", str(part), "--resume"]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["final"]["J/unsup"] == b["final"]["J/unsup"] and a["final"]["gamma/sup"] == b["final"]["gamma/sup"]
    assert a["history"][2:] == b["history"] and (part / "curves.png").is_file()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(algo="fista"), "algo"),
        (dict(losses="sup,mse"), "losses"),
        (dict(losses=""), "losses"),
        (dict(p=0.0), "p must"),
        (dict(test_p=1.5), "test_p"),
        (dict(lambd=0.0), "lambd"),
        (dict(layers=0), "layers"),
    ],
)
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        UnfoldedISTAConfig(**bad)

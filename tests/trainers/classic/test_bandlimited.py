"""Shallow networks with bandlimited random weights: the Omega x k grid and width scans' pass criteria, the pure math
against plain references, and the recipe path (CLI, --resume, one-line errors).

The experiment (Li, Sonoda, Cao, Wang, Liang 2020; the qualitative claim only, the bound's constants are unverified):
x ~ U[-1, 1] (2000 training, 1000 test points), targets sin(k pi x), tanh units with a_j, b_j ~ U[-Omega, Omega],
ridge readout with lambda 1e-8, widths 100, 400, 1600 (nested: the first N units of one draw).
"""

import json

import numpy as np
import pytest
import torch
from support import assert_refused

from posttrain.trainers.classic.bandlimited import (
    BandlimitedConfig,
    BandlimitedTrainer,
    gram_condition,
    hidden_features,
    ridge_readout,
    sample_bandlimited,
    sine_targets,
)

torch.set_num_threads(1)
WIDTHS = [100, 400, 1600]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Omega -> the logged numbers of each width (one train() writes its results; the others step directly)."""
    out = {}
    for omega in (2.0, 20.0, 200.0):
        folder = tmp_path_factory.mktemp(f"omega{omega:g}")
        t = BandlimitedTrainer(
            BandlimitedConfig(
                omega=omega, widths=WIDTHS, frequencies=[4, 16, 64], seed=0, max_seconds=3600, output_dir=str(folder)
            )
        )
        if omega == 2.0:
            t.train(verbose=False)
            assert (folder / "results.json").is_file() and (folder / "curves.png").is_file()
        else:
            for _ in WIDTHS:
                t.step()
                t.history.append(t.evaluate())
        out[omega] = t.history
    return out


def test_a_too_small_a_band_leaves_a_floor_that_width_cannot_lower(scans):
    mse = [h["test_mse_k16"] for h in scans[2.0]]
    assert all(m >= 0.3 for m in mse), mse  # sin(16 pi x) has variance 1/2: about nothing is fitted
    assert mse[0] / mse[-1] < 2, mse


def test_b_a_wide_band_fits_and_width_helps(scans):
    mse = [h["test_mse_k16"] for h in scans[200.0]]
    assert mse[-1] <= 1e-3, mse
    assert all(b < a for a, b in zip(mse, mse[1:])), mse


def test_c_band_20_fits_k4_but_not_k64(scans):
    last = scans[20.0][-1]
    assert last["width"] == 1600
    assert last["test_mse_k4"] <= 1e-6, last
    assert last["test_mse_k64"] >= 0.3, last


def test_logged_numbers(scans):
    for omega, history in scans.items():
        assert [h["width"] for h in history] == WIDTHS and all(h["omega"] == omega for h in history)
        conds = [h["cond_gram"] for h in history]
        assert all(1 < a < b for a, b in zip(conds, conds[1:])), conds  # more units, closer to rank-deficient


# --- pure math ------------------------------------------------------------------------------------------------


def test_draw_has_bounded_support_and_fills_it():
    a, b = sample_bandlimited(np.random.default_rng(0), 20000, 3, omega=2.5)
    assert a.shape == (20000, 3) and b.shape == (20000,)
    assert np.abs(a).max() <= 2.5 and np.abs(b).max() <= 2.5
    assert np.abs(a).max() > 2.49 and abs(a.mean()) < 0.05 and a.var() == pytest.approx(2.5**2 / 3, rel=0.03)


def test_hidden_features_by_hand():
    x = np.array([[0.5, -1.0], [2.0, 0.0]])
    a = np.array([[1.0, 2.0], [-0.5, 0.25], [0.0, 1.0]])
    b = np.array([0.1, -0.2, 0.3])
    z = np.array([[0.5 - 2.0 - 0.1, -0.25 - 0.25 + 0.2, -1.0 - 0.3], [2.0 - 0.1, -1.0 + 0.2, -0.3]])
    np.testing.assert_allclose(hidden_features(x, a, b, "tanh"), np.tanh(z), rtol=0, atol=1e-15)
    np.testing.assert_allclose(hidden_features(x, a, b, "sigmoid"), 1 / (1 + np.exp(-z)), rtol=0, atol=1e-15)
    np.testing.assert_allclose(hidden_features(x, a, b, "relu"), np.maximum(z, 0), rtol=0, atol=0)


def test_ridge_readout_against_the_closed_form_and_lstsq():
    rng = np.random.default_rng(1)
    H, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 2))
    lam = 0.03
    expected = np.linalg.inv(H.T @ H + 50 * lam * np.eye(8)) @ H.T @ y
    np.testing.assert_allclose(ridge_readout(H, y, lam), expected, rtol=1e-10, atol=1e-12)
    from sklearn.linear_model import Ridge

    sk = Ridge(alpha=50 * lam, fit_intercept=False, solver="cholesky").fit(H, y).coef_.T
    np.testing.assert_allclose(ridge_readout(H, y, lam), sk, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ridge_readout(H, y[:, 0], 0.0), np.linalg.lstsq(H, y[:, 0], rcond=None)[0], atol=1e-12)
    # one right-hand side per target gives the targets' separate solutions
    np.testing.assert_allclose(ridge_readout(H, y, lam)[:, 1], ridge_readout(H, y[:, 1], lam), rtol=1e-12)


def test_gram_condition_against_numpy():
    rng = np.random.default_rng(2)
    H = rng.normal(size=(40, 6))
    assert gram_condition(H, 0.0) == pytest.approx(np.linalg.cond(H.T @ H), rel=1e-8)
    assert gram_condition(H, 0.1) == pytest.approx(np.linalg.cond(H.T @ H + 40 * 0.1 * np.eye(6)), rel=1e-8)


def test_targets_and_nested_widths(tmp_path):
    x = np.array([[0.25], [-0.5]])
    np.testing.assert_allclose(sine_targets(x, [1, 4]), [[np.sin(np.pi / 4), 0.0], [-1.0, 0.0]], atol=1e-15)
    t = BandlimitedTrainer(
        BandlimitedConfig(omega=5, widths=[3, 7], n_train=30, n_test=10, max_steps=2, output_dir=str(tmp_path))
    )
    a, b = t.a.copy(), t.b.copy()
    t.step()
    np.testing.assert_allclose(t.predict(t.x_test), hidden_features(t.x_test, a[:3], b[:3]) @ t.c, atol=0)
    t.step()
    assert t.c.shape == (7, 4) and np.array_equal(t.a, a)  # the width-7 net holds the width-3 one's units


# --- recipe path ----------------------------------------------------------------------------------------------


def test_recipe_runs_resumes_and_lists(tmp_path, capsys):
    from posttrain.cli import main

    small = ["--n_train", "200", "--n_test", "100", "--widths", "[20, 40, 80]"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "bandlimited/omega20", *small, "--output_dir", str(full)]) == 0
    half = BandlimitedTrainer(
        BandlimitedConfig(omega=20, n_train=200, n_test=100, widths=[20, 40, 80], max_steps=3, output_dir=str(part))
    )
    half.step()
    half.history.append({"step": 1, **half.evaluate()})
    half.save()
    assert main(["train", "bandlimited/omega20", *small, "--output_dir", str(part), "--resume"]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert a["history"] == b["history"] and a["final"]["test_mse_k16"] == b["final"]["test_mse_k16"]
    assert [h["width"] for h in a["history"]] == [20, 40, 80] and b["final"]["step"] == 3
    capsys.readouterr()
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("bandlimited", "bandlimited/omega2", "bandlimited/omega200"))


@pytest.mark.parametrize(
    "override, message",
    [
        (["--activation", "cos"], "unknown activation 'cos'"),
        (["--widths", "[400, 100]"], "widths must be increasing"),
        (["--max_steps", "4"], "max_steps (4) exceeds the 3 widths"),
        (["--omega", "0"], "omega must be > 0"),
    ],
)
def test_bad_values_are_one_line_errors(override, message, tmp_path, capsys):
    assert_refused(["train", "bandlimited/omega2", *override], message, capsys, tmp_path / "x")

"""BEO unlearnable examples: the digits experiment (train 70 / test 30, half of the training set protected at
eps = 0.2 L-inf, centroid shift k = 16 and 20 PGA steps, logistic-regression arms, 3 seeds) on one shared run per
mode; the centroid shift on a hand-computed example; the kernel estimator against a direct loop and its gradient
against finite differences; the k-NN proxy against scikit-learn; the Dataset stage; resume."""

import numpy as np
import pytest
import torch

from posttrain.data.beo import (
    BEOConfig,
    BEOTrainer,
    bayes_error_estimate,
    centroid_shift,
    criteria,
    kernel_posterior,
    knn_error,
    pga_step,
    project,
    protect_dataset,
)

torch.set_num_threads(1)
SEEDS = (0, 1, 2)
STEPS = {"centroid_shift": 1, "pga": 20}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode -> the final evaluate() of each seed (stepped directly: no plot), plus the clean B_hat."""
    out = {}
    for mode, steps in STEPS.items():
        results = []
        for seed in SEEDS:
            t = BEOTrainer(
                BEOConfig(mode=mode, max_steps=steps, seed=seed, output_dir=str(tmp_path_factory.mktemp(mode)))
            )
            clean = t.evaluate()["bayes_error"]
            for _ in range(steps):
                t.step()
            results.append({**t.evaluate(), "bayes_error_clean": clean, "in_range": bool(
                (t.Xp + t.delta).min() >= 0 and (t.Xp + t.delta).max() <= 1)})  # fmt: skip
        out[mode] = results
    return out


@pytest.mark.parametrize("mode", list(STEPS))
def test_perturbation_stays_in_the_ball_and_the_range(runs, mode):
    for r in runs[mode]:
        assert r["delta_linf"] <= 0.2 + 1e-12 and r["in_range"]


@pytest.mark.parametrize("mode", list(STEPS))
def test_knn_error_of_the_protected_half_at_least_doubles(runs, mode):
    # criterion: leave-one-out 5-NN error on the protected half >= 2x its clean value (mean over 3 seeds; measured
    # centroid_shift 2.75x, pga 5.80x; pga with the median-pairwise bandwidth: 1.96x, not reproduced)
    assert criteria(runs[mode])["knn_ratio"] >= 2.0, criteria(runs[mode])


@pytest.mark.parametrize("mode", list(STEPS))
def test_protected_half_adds_no_learnable_signal(runs, mode):
    # criterion: acc(clean + BEO) <= acc(clean only) + 1 pp (measured: centroid_shift +0.86 pp, pga +0.74 pp; the
    # unmodified half adds +1.35 pp)
    assert criteria(runs[mode])["beo_minus_clean_only_pp"] <= 1.0, criteria(runs[mode])


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: acc(clean+noise) - acc(clean+BEO) >= 2 pp; on digits with logistic regression "
    "a whole clean half is worth only 1.35 pp, and BEO does not push accuracy below clean-only (noise - BEO: "
    "centroid_shift 0.19 pp, pga 0.31 pp)",
)
@pytest.mark.parametrize("mode", list(STEPS))
def test_beo_is_worse_than_noise_by_two_points(runs, mode):
    assert criteria(runs[mode])["noise_minus_beo_pp"] >= 2.0, criteria(runs[mode])


def test_pga_raises_the_estimated_bayes_error(runs):
    for r in runs["pga"]:
        assert r["bayes_error"] > r["bayes_error_clean"] + 0.05


def test_centroid_shift_worked_example():
    # two classes in 2-D; PCA with 2 components is a rotation, so pinv brings the centroid difference back exactly
    X = np.array([[0.1, 0.1], [0.3, 0.1], [0.8, 0.9], [0.6, 0.7]])
    y = np.array([0, 0, 1, 1])
    mu = {0: np.array([0.2, 0.1]), 1: np.array([0.7, 0.8])}
    raw = np.array([mu[1 - c] - x for x, c in zip(X, y)])  # towards the *other* class
    expected = raw * np.minimum(1.0, 0.25 / np.abs(raw).max(axis=1))[:, None]
    np.testing.assert_allclose(centroid_shift(X, y, 0.25, k=2), expected, atol=1e-12)
    # a large eps moves each point onto the other centroid (then clipped to [0, 1])
    np.testing.assert_allclose(X + centroid_shift(X, y, 10.0, k=2), [mu[1 - c] for c in y], atol=1e-12)


def test_project_onto_ball_and_range():
    X = np.array([[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(project(np.array([[-0.4, 0.2, 0.4]]), X, 0.2), [[0.0, 0.1, 0.0]])
    d = project(np.array([[0.0, 0.3, -0.4]]), X, 0.25, "l2")
    np.testing.assert_allclose(d, [[0.0, 0.15, -0.2]])


def test_kernel_posterior_against_a_direct_loop():
    rng = np.random.default_rng(0)
    X, y, h = rng.random((12, 3)), rng.integers(3, size=12), 0.4
    p = kernel_posterior(torch.tensor(X), torch.tensor(y), h, 3).numpy()
    for i in range(12):
        w = np.array([sum(np.exp(-np.sum((X[i] - X[j]) ** 2) / (2 * h * h)) for j in range(12) if j != i and y[j] == c)
                      for c in range(3)])  # fmt: skip
        np.testing.assert_allclose(p[i], w / w.sum(), rtol=1e-10)
    b = bayes_error_estimate(torch.tensor(X), torch.tensor(y), h, 3)
    assert float(b) == pytest.approx(float(np.mean(1 - p.max(axis=1))))


def test_bayes_error_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    X, y = torch.tensor(rng.random((8, 2))), torch.tensor(rng.integers(2, size=8))
    assert torch.autograd.gradcheck(lambda Z: bayes_error_estimate(Z, y, 0.3, 2), (X.requires_grad_(),))


def test_pga_step_ascends():
    rng = np.random.default_rng(2)
    X = np.clip(np.concatenate([rng.normal(0.4, 0.08, (20, 2)), rng.normal(0.6, 0.08, (20, 2))]), 0, 1)
    y = np.repeat([0, 1], 20)
    delta, values = np.zeros_like(X), []
    for _ in range(6):
        delta, b = pga_step(X, y, delta, 0.15, 0.02, 0.1, 2)
        values.append(b)
    # measured: 0.115, 0.186, 0.266, 0.341, 0.400, 0.447
    assert all(b1 > b0 + 0.03 for b0, b1 in zip(values, values[1:])), values
    assert np.abs(delta).max() <= 0.15 + 1e-12


def test_knn_error_matches_scikit_learn_leave_one_out():
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    X, y = rng.random((60, 4)), rng.integers(3, size=60)
    pred = cross_val_predict(KNeighborsClassifier(5), X, y, cv=LeaveOneOut())
    assert knn_error(X, y, 5) == pytest.approx(float((pred != y).mean()))


def test_protect_dataset_is_a_data_stage():
    from datasets import Dataset

    rng = np.random.default_rng(4)
    X, y = rng.random((40, 6)), np.repeat([0, 1], 20)
    ds = Dataset.from_dict({"features": X.tolist(), "label": y.tolist(), "id": list(range(40))})
    out, report = protect_dataset(ds, BEOConfig(mode="centroid_shift", epsilon=0.1, pca_components=4))
    assert out.column_names == ["label", "id", "features"] and out["id"] == list(range(40))
    moved = np.asarray(out["features"]) - X
    assert 0 < np.abs(moved).max() <= 0.1 + 1e-12 and report["max_delta_linf"] == pytest.approx(np.abs(moved).max())
    with pytest.raises(ValueError, match="column 'pixels' not in the dataset"):
        protect_dataset(ds, BEOConfig(), feature_column="pixels")


def test_resume_continues_the_same_ascent(tmp_path):
    def make(folder):
        return BEOTrainer(BEOConfig(mode="pga", max_steps=4, output_dir=str(folder)))

    straight = make(tmp_path / "a")
    for _ in range(4):
        straight.step()
    first = make(tmp_path / "b")
    for _ in range(2):
        first.step()
    first.save()
    resumed = make(tmp_path / "b")
    assert resumed.load() and resumed.global_step == 2
    for _ in range(2):
        resumed.step()
    np.testing.assert_array_equal(resumed.delta, straight.delta)


def test_recipe_errors_name_the_key():
    from posttrain import UserError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(UserError, match="centroid_shift is one closed-form step; set max_steps: 1"):
        load_recipe("beo/digits_centroid", {"max_steps": 5})
    with pytest.raises(UserError, match="mode must be one of centroid_shift, pga"):
        load_recipe("beo/digits_pga", {"mode": "pgd"})


def test_recipe_runs(tmp_path):
    import json

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import train

    final = train(load_recipe("beo/digits_centroid", {"output_dir": str(tmp_path / "beo")}))
    assert final["delta_linf"] == pytest.approx(0.2)
    rows = [json.loads(line) for line in (tmp_path / "beo" / "protected.jsonl").read_text().splitlines()]
    assert len(rows) == 629 and len(rows[0]["features"]) == 64

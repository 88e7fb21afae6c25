"""Private-GSD: the smallest categorical experiment (6 x 3-valued attributes, n = 3000, 15 two-way marginals, rho = 0.5
one-shot, N' = 300) with its three pass criteria on one shared run; the measurement noise, the incremental fitness,
the selection mechanism, the adaptive ledger, prefix queries, resume, and the recipe."""

import itertools
import json
import math

import numpy as np
import pytest

from posttrain.data.privacy_accounting import gaussian_sigma, zcdp_eps
from posttrain.data.private_gsd import (
    GeneticSD,
    PrivateGSDConfig,
    PrivateGSDTrainer,
    QuerySet,
    gaussian_measure,
    independent_marginals_baseline,
    latent_categorical,
    max_marginal_error,
    random_rows,
    report_noisy_max,
    synthesize,
    synthesize_dataset,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The experiment, run once through train() (results.json, synthetic.jsonl), with the baseline."""
    out = tmp_path_factory.mktemp("gsd")
    cfg = PrivateGSDConfig(mutations=30, crossovers=30, max_steps=4000, eval_every=4000, output_dir=str(out))
    trainer = PrivateGSDTrainer(cfg)
    final = trainer.train(verbose=False)
    baseline = independent_marginals_baseline(trainer.X, trainer.domain, 0.5, 300, np.random.default_rng(1))
    return {
        "trainer": trainer,
        "final": final,
        "out": out,
        "gsd": max_marginal_error(trainer.queries, trainer.X, trainer.gsd.best),
        "baseline": max_marginal_error(trainer.queries, trainer.X, baseline),
        "floor": float(np.abs(trainer.noisy - trainer.true).max()),
    }


def test_gsd_error_is_near_the_noise_floor(run):
    # criterion: err(GSD) <= 2 x noise floor + 0.01 (measured: GSD 0.0057, floor 0.0055)
    assert run["gsd"] == pytest.approx(run["final"]["max_error"])
    assert run["gsd"] <= 2 * run["floor"] + 0.01, run


def test_gsd_beats_independent_marginals(run):
    # criterion: err(GSD) <= 0.25 x err(independent noisy 1-way marginals) (measured: 0.0057 vs 0.111)
    assert run["gsd"] <= 0.25 * run["baseline"], run


def test_privacy_report_states_the_budget_spent(run):
    privacy = json.loads((run["out"] / "results.json").read_text())["final"]["privacy"]
    assert privacy["rho_spent"] <= 0.5 * (1 + 1e-12) and privacy["rho_spent"] == pytest.approx(0.5, rel=1e-12)
    assert privacy["mechanisms"] == 15 and privacy["rho_by_kind"] == {"gaussian": pytest.approx(0.5)}
    # (eps, delta) from an independent brute-force infimum over the Renyi order
    a = 1.0 + np.logspace(-6, 4, 200_001)
    log_delta = (a - 1) * (a * 0.5 - privacy["epsilon"]) + a * np.log1p(-1 / a) - np.log(a - 1)
    assert np.exp(log_delta.min()) == pytest.approx(1e-5, rel=1e-3)
    rows = [json.loads(line) for line in (run["out"] / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and all(set(r.values()) <= {0, 1, 2} and len(r) == 6 for r in rows)


def test_incremental_statistics_equal_a_recomputation(run):
    gsd = run["trainer"].gsd
    np.testing.assert_allclose(gsd.best_stats, run["trainer"].queries.answers(gsd.best), atol=1e-12)
    for X, stats in zip(gsd.archive, gsd.archive_stats):
        np.testing.assert_allclose(stats, run["trainer"].queries.answers(X), atol=1e-12)
    assert gsd.best_fitness == pytest.approx(float(((gsd.target - gsd.best_stats) ** 2).sum()), rel=1e-9)


def test_row_statistics_match_brute_force():
    domain, rng = [2, 3, 4, "numeric"], np.random.default_rng(0)
    X = random_rows(domain, 200, rng)
    q = QuerySet.build(domain, 2, 5)
    R = q.row_statistics(X)
    for (kind, cols, p), (a, b) in zip(q.workloads, q.slices):
        if kind == "marginal":
            for i, cell in enumerate(itertools.product(*[range(s) for s in p])):
                np.testing.assert_array_equal(R[:, a + i], np.all(X[:, list(cols)] == np.array(cell), axis=1))
        else:
            np.testing.assert_array_equal(R[:, a:b], X[:, cols[0], None] <= p[None, :])
    assert q.sensitivity(0, 3000) == pytest.approx(math.sqrt(2) / 3000)
    assert q.sensitivity(len(q.workloads) - 1, 100) == pytest.approx(math.sqrt(5) / 100)


def test_measurement_noise_has_the_accounted_sigma():
    domain = [3, 3]
    q = QuerySet.build(domain, 2, 1)
    answers, rng = np.full(q.size, 0.5), np.random.default_rng(0)
    draws = np.stack([gaussian_measure(answers, q, [0], 0.05, 1000, rng)[0] for _ in range(4000)])
    sigma = gaussian_sigma(0.05, math.sqrt(2) / 1000)  # = 1/1000 / sqrt(0.05)
    assert sigma == pytest.approx(1 / (1000 * math.sqrt(0.05)))
    assert draws.std() == pytest.approx(sigma, rel=0.03) and abs(draws.mean() - 0.5) < 5 * sigma / 100


def test_report_noisy_max_is_the_exponential_mechanism():
    scores, eps, sens, rng = np.array([0.0, 0.01, 0.02, 0.05]), 2.0, 0.01, np.random.default_rng(0)
    counts = np.bincount([report_noisy_max(scores, eps, sens, rng) for _ in range(20000)], minlength=4)
    expected = np.exp(eps * scores / (2 * sens))
    np.testing.assert_allclose(counts / 20000, expected / expected.sum(), atol=0.015)


def test_adaptive_ledger_composes_to_the_budget(tmp_path):
    cfg = PrivateGSDConfig(
        measurement="adaptive", adaptive_rounds=5, rho=0.2, max_steps=250, eval_every=250, output_dir=str(tmp_path)
    )
    trainer = PrivateGSDTrainer(cfg)
    while trainer.global_step < cfg.max_steps:
        trainer.step()
    ledger = trainer.accountant.ledger
    assert [w.split(":")[0] for w, _ in ledger] == ["exponential", "gaussian"] * 5
    assert all(r == pytest.approx(0.02) for _, r in ledger) and trainer.accountant.spent == pytest.approx(0.2)
    measured = [int(w.split()[-1]) for w, _ in ledger if w.startswith("gaussian")]
    assert len(set(measured)) == 5  # a measured workload is never selected again
    assert trainer.privacy_report()["epsilon"] == pytest.approx(zcdp_eps(0.2, cfg.delta))


def test_epsilon_delta_budget_is_met():
    cfg = PrivateGSDConfig(epsilon=1.0, delta=1e-6, max_steps=1, output_dir="unused")
    assert zcdp_eps(cfg.rho_budget, 1e-6) == pytest.approx(1.0, rel=1e-6)
    X, domain = latent_categorical(500, 3, 3, 0, seed=0)
    cfg = PrivateGSDConfig(epsilon=1.0, delta=1e-6, max_steps=200, synthetic_rows=50, output_dir="unused")
    S, report = synthesize(X, domain, cfg)
    assert S.shape == (50, 3) and report["privacy"]["epsilon"] <= 1.0 + 1e-6
    assert report["non_private_diagnostics"]["max_error"] < 0.1
    with pytest.raises(ValueError, match="column 1: row 4 is outside its domain 3"):
        X[4, 1] = 3
        synthesize(X, domain, cfg)


def test_synthesize_dataset_is_a_data_stage():
    from datasets import Dataset

    X, _ = latent_categorical(600, 2, 3, 1, seed=2)
    colours = ["red", "green", "blue"]
    ds = Dataset.from_dict({"colour": [colours[int(v)] for v in X[:, 0]], "size": X[:, 1].astype(int).tolist(),
                            "score": X[:, 2].tolist(), "secret_id": list(range(600))})  # fmt: skip
    cfg = PrivateGSDConfig(rho=1.0, max_steps=300, synthetic_rows=40, prefix_thresholds=4, output_dir="unused")
    out, report = synthesize_dataset(ds, {"colour": colours, "size": [0, 1, 2], "score": "numeric"}, cfg)
    assert out.column_names == ["colour", "size", "score"] and len(out) == 40
    assert set(out["colour"]) <= set(colours) and all(0 <= v <= 1 for v in out["score"])
    assert report["privacy"]["rho_spent"] == pytest.approx(1.0)
    first_red = ds["colour"].index("red")
    with pytest.raises(ValueError, match=f"column 'colour' row {first_red}: value 'red' is not in its public domain"):
        synthesize_dataset(ds, {"colour": ["green", "blue"]}, cfg)


def test_prefix_queries_on_numeric_attributes():
    # extension: 1-D prefix queries on numeric attributes (non-differentiable), GSD error <= 0.05
    trainer = PrivateGSDTrainer(PrivateGSDConfig(num_numeric=2, max_steps=3000, eval_every=3000, output_dir="unused"))
    while trainer.global_step < 3000 and not trainer.done():
        trainer.step()
    prefix = [s for (kind, _, _), s in zip(trainer.queries.workloads, trainer.queries.slices) if kind == "prefix"]
    errors = np.abs(trainer.gsd.best_stats - trainer.true)
    assert len(prefix) == 2 and max(errors[a:b].max() for a, b in prefix) <= 0.05
    assert errors.max() <= 0.05


def test_resume_continues_the_same_search(tmp_path):
    def make(folder):
        return PrivateGSDTrainer(PrivateGSDConfig(max_steps=200, synthetic_rows=60, output_dir=str(folder)))

    straight = make(tmp_path / "a")
    for _ in range(200):
        straight.step()
    first = make(tmp_path / "b")
    for _ in range(120):
        first.step()
    first.save()
    resumed = make(tmp_path / "b")
    assert resumed.load() and resumed.global_step == 120
    for _ in range(80):
        resumed.step()
    np.testing.assert_array_equal(resumed.gsd.best, straight.gsd.best)
    np.testing.assert_array_equal(resumed.gsd.archive, straight.gsd.archive)
    assert resumed.accountant.spent == straight.accountant.spent


def test_candidates_change_one_cell_each():
    domain = [3, 4, "numeric"]
    q, rng = QuerySet.build(domain, 2, 4), np.random.default_rng(5)
    gsd = GeneticSD(q, 50, 5, rng)
    gsd.set_target(np.zeros(q.size), np.ones(q.size, dtype=bool))
    rows, added = gsd.candidates(400, 400, rng)
    changed = (added != gsd.best[rows]).sum(axis=1)
    assert changed.max() <= 1
    # mutations: a fresh random value, so most candidates change their cell (P(same) <= 1/3 per categorical cell)
    assert (changed[:400] == 1).mean() > 0.5
    # crossovers: the changed value comes from some elite data set's same column (numeric: noised, clipped)
    for r, new in zip(rows[400:], added[400:]):
        col = np.flatnonzero(new != gsd.best[r])
        if len(col) and domain[col[0]] != "numeric":
            assert new[col[0]] in set(gsd.archive[:, :, col[0]].ravel())
    assert added[:, 2].min() >= 0 and added[:, 2].max() <= 1


def test_genetic_search_improves_a_random_start():
    q = QuerySet.build([3, 3, 3], 2, 1)
    rng = np.random.default_rng(0)
    X, _ = latent_categorical(1000, 3, 3, 0, seed=1)
    gsd = GeneticSD(q, 100, 5, rng)
    gsd.set_target(q.answers(X), np.ones(q.size, dtype=bool))
    start = gsd.best_fitness
    for _ in range(300):
        gsd.generation(10, 10, rng)
    assert gsd.best_fitness < 0.1 * start


def test_recipe_errors_name_the_key():
    from posttrain import UserError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(UserError, match="measurement must be one of one_shot, adaptive"):
        load_recipe("private_gsd/toy_one_shot", {"measurement": "oneshot"})
    with pytest.raises(UserError, match="rho must be > 0"):
        load_recipe("private_gsd/toy_one_shot", {"rho": 0})

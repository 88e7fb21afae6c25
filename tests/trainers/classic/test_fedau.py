"""FedAU: the quadratic benchmark's pass criteria plus unit tests of the interval rule and aggregation.

The benchmark (N = 100 quadratic clients, d = 10, participation p_n correlated with the client's data, I = 5 local
steps, T = 3000 rounds, cutoff K = 50; described in ``posttrain/trainers/classic/fedau.py``) is this project's, not
the paper's (Wang & Ji, arXiv 2306.03401). Its pass bars were set from a numpy prototype of the same benchmark,
written from the math before this implementation (FedAU / FedAvg excess-loss ratios 0.006-0.051 over 5 seeds).
"""

import copy
import json

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.fedau import (
    FedAUConfig,
    FedAUTrainer,
    ParticipationTracker,
    aggregate,
    compare_aggregators,
)

torch.set_num_threads(1)


def test_fedau_removes_participation_bias(tmp_path):
    """Pass criteria: 3 seeds, default config (N=100, d=10, I=5, T=3000, K=50)."""
    ex = compare_aggregators(("fedau", "fedavg", "known_prob"), seeds=(0, 1, 2), output_dir=str(tmp_path))
    for seed, (au, avg) in enumerate(zip(ex["fedau"], ex["fedavg"])):
        assert au <= 0.2 * avg, f"seed {seed}: excess fedau={au:.4g} vs fedavg={avg:.4g}"
    assert np.mean(ex["fedau"]) <= 10 * np.mean(ex["known_prob"]), ex
    assert (tmp_path / "fedau-seed0" / "results.json").exists()


def test_interval_rule_with_cutoff():
    # Client 0: P A A P A A A A P; client 1 never participates; client 2 always does. Cutoff K = 3.
    seq = np.array([[1, 0, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=bool)
    # Intervals: client 0 -> 1, 3, 3 (cutoff at round 7), 2; client 1 -> 3 at rounds 3, 6, 9.
    expected = [[1, 1, 1, 2, 2, 2, 7 / 3, 7 / 3, 9 / 4], [1, 1, 3, 3, 3, 3, 3, 3, 3], [1] * 9]
    tr = ParticipationTracker(num_clients=3, cutoff=3)
    np.testing.assert_array_equal(tr.weights(), [1.0, 1.0, 1.0])  # no interval seen yet
    for t in range(seq.shape[1]):
        tr.update(seq[:, t])
        np.testing.assert_allclose(tr.weights(), [row[t] for row in expected], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(tr.miss, [0, 0, 0])
    np.testing.assert_array_equal(tr.interval_count, [4, 3, 9])


def test_weights_estimate_inverse_probability():
    """Without a binding cutoff, omega_n -> 1/p_n (Bernoulli gaps are geometric with mean 1/p)."""
    rng = np.random.default_rng(5)
    p = np.array([0.05, 0.2, 0.5, 1.0])
    tr = ParticipationTracker(num_clients=4, cutoff=10_000)
    for _ in range(20_000):
        tr.update(rng.random(4) < p)
    np.testing.assert_allclose(tr.weights(), 1 / p, rtol=0.05)


def test_aggregate_divides_by_all_clients():
    participating = np.zeros(10, dtype=bool)
    participating[[2, 7]] = True
    deltas = np.array([[1.0, 2.0], [3.0, -4.0]])  # rows: clients 2 and 7
    weights = np.arange(10, dtype=float)
    np.testing.assert_allclose(aggregate(deltas, participating, weights, 10), (2 * deltas[0] + 7 * deltas[1]) / 10)
    np.testing.assert_array_equal(aggregate(np.zeros((0, 2)), np.zeros(10, bool), weights, 10), [0.0, 0.0])


def _first_update(aggregator, **kw):
    tr = FedAUTrainer(FedAUConfig(aggregator=aggregator, seed=3, **kw))
    info = tr.step()
    return tr.x.copy(), info["participants"], tr


def test_trainer_denominators_and_weight_timing():
    x_all, n_part, _ = _first_update("average_all")
    x_avg, _, _ = _first_update("fedavg")
    x_au, _, tr = _first_update("fedau")
    # Same seed -> same participants and noise; FedAvg divides by P, the others by N = 100.
    np.testing.assert_allclose(x_all, x_avg * n_part / 100)
    # Round 1: no interval has been seen, so FedAU's weights are all 1 (= average_all) ...
    np.testing.assert_array_equal(x_au, x_all)
    # ... but the tracker has recorded round 1, and the weights move from round 2 on.
    assert tr.tracker.interval_count.sum() == n_part
    x_known, _, _ = _first_update("known_prob")
    assert not np.allclose(x_known, x_all)


def reference_run(cfg: FedAUConfig, rounds: int) -> list:
    """Plain-loop FedAU simulation (lists of intervals, per-client loops) drawing the same random
    numbers in the same order as the trainer. Returns x after every round."""
    base = FedAUTrainer(cfg)
    c, p, N, K = base.c, base.p, cfg.num_clients, cfg.cutoff
    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(base.rng.bit_generator.state)  # state after the problem draw
    x, miss, intervals, xs = np.zeros(cfg.dim), [0] * N, [[] for _ in range(N)], []
    for t in range(rounds):
        lr = cfg.local_lr * (0.1 if t >= cfg.lr_decay_at * cfg.max_steps else 1.0)
        part = rng.random(N) < p
        idx = np.flatnonzero(part)
        local = np.tile(x, (idx.size, 1))
        for _ in range(cfg.local_steps):
            local = local - lr * (local - c[idx] + cfg.grad_noise * rng.standard_normal(local.shape))
        if cfg.aggregator == "fedau":
            w = [np.mean(iv) if iv else 1.0 for iv in intervals]
        elif cfg.aggregator == "known_prob":
            w = [1.0 / pn for pn in p]
        else:
            w = [1.0] * N
        denom = max(idx.size, 1) if cfg.aggregator == "fedavg" else N
        total = np.zeros(cfg.dim)
        for j, n in enumerate(idx):
            total += w[n] * (local[j] - x)
        x = x + cfg.global_lr * total / denom
        for n in range(N):
            if part[n]:
                intervals[n].append(miss[n] + 1)
                miss[n] = 0
            else:
                miss[n] += 1
                if miss[n] >= K:
                    intervals[n].append(K)
                    miss[n] = 0
        xs.append(x)
    return xs


@pytest.mark.parametrize("aggregator", ["fedau", "fedavg", "average_all", "known_prob"])
def test_rounds_match_plain_reference(aggregator):
    cfg = FedAUConfig(num_clients=30, dim=4, cutoff=6, max_steps=80, aggregator=aggregator, seed=11)
    tr = FedAUTrainer(cfg)
    assert np.all((tr.p > 0.02) & (tr.p < 0.5))
    for t, x_ref in enumerate(reference_run(cfg, cfg.max_steps)):
        tr.step()
        np.testing.assert_allclose(tr.x, x_ref, rtol=1e-12, atol=1e-12, err_msg=f"round {t + 1}")


def test_config_validation():
    with pytest.raises(ValueError, match="valid: fedau, fedavg, average_all, known_prob"):
        FedAUConfig(aggregator="mifa")
    with pytest.raises(ValueError, match="participation"):
        FedAUConfig(participation="markov-0.5")
    with pytest.raises(ValueError, match="cutoff"):
        FedAUConfig(cutoff=0)
    with pytest.raises(ValueError, match="lr_decay_at"):
        FedAUConfig(lr_decay_at=1.5)
    with pytest.raises(ValueError, match="local_lr"):
        FedAUConfig(local_lr=0.0)
    with pytest.raises(ValueError, match="grad_noise"):
        FedAUConfig(grad_noise=-1.0)


def test_resume_gives_identical_final_model(tmp_path):
    cfg = dict(max_steps=300, eval_every=100, output_dir=str(tmp_path / "a"))
    full = FedAUTrainer(FedAUConfig(**cfg))
    full.train(verbose=False)

    part = FedAUTrainer(FedAUConfig(**cfg))
    for _ in range(120):
        part.step()
    saved = copy.deepcopy(part.state_dict())
    for _ in range(7):
        part.step()  # must not leak into the saved state
    resumed = FedAUTrainer(FedAUConfig(**{**cfg, "output_dir": str(tmp_path / "b")}))
    resumed.load_state_dict(saved)
    final = resumed.train(verbose=False)
    assert final["round"] == 300
    np.testing.assert_array_equal(resumed.x, full.x)
    np.testing.assert_array_equal(resumed.tracker.weights(), full.tracker.weights())

    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["final"]["excess_loss"] == final["excess_loss"]
    assert [h["round"] for h in results["history"]] == [200, 300]
    with pytest.raises(ValueError, match="seed"):
        FedAUTrainer(FedAUConfig(**{**cfg, "seed": 1})).load_state_dict(saved)


def test_max_seconds_guard(tmp_path):
    tr = FedAUTrainer(FedAUConfig(max_steps=10**9, max_seconds=0.05, output_dir=str(tmp_path)))
    final = tr.train(verbose=False)
    assert final["stopped_by"] == "max_seconds" and 0 < final["round"] < 10**9

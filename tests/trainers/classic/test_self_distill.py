"""Self-distillation with ground-truth mixing: the official toy's table, the B recursion, the closed-form alpha*,
and the LLM loss (hand computation; alpha = 1 is stock SFT)."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.self_distill import (
    KRRSelfDistillTrainer, SelfDistillConfig, b_limit, b_recursion, distill_target, gt_mixed_distill_loss,
    optimal_alpha, rbf_kernel,
)

torch.set_num_threads(1)

# README of Kennethborup/self_distillation: MSE to sin(2 pi x) per step, then the limit
README_TABLE = {
    0.0: [0.16477, 0.15076, 0.14915, 0.15561, 0.16735, 0.18251, 0.49505],
    0.35: [0.16477, 0.15424, 0.15089, 0.14983, 0.14954, 0.14948, 0.14959],
}


@pytest.mark.parametrize("alpha", sorted(README_TABLE))
def test_krr_toy_reproduces_the_readme_table(alpha, tmp_path):
    trainer = KRRSelfDistillTrainer(SelfDistillConfig(alpha=str(alpha), max_steps=6, output_dir=str(tmp_path)))
    losses = []
    for _ in range(6):
        trainer.step()
        losses.append(trainer.evaluate()["loss_to_truth"])
    losses.append(trainer.evaluate()["loss_limit"])
    np.testing.assert_allclose(losses, README_TABLE[alpha], rtol=0, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.8])
def test_b_recursion_equals_the_direct_iterate(alpha):
    t = KRRSelfDistillTrainer(SelfDistillConfig(alpha=str(alpha)))
    d, V = t.eig, t.V
    for tau, b in enumerate(b_recursion(d, t.args.lambd, alpha, 8), start=1):
        t.step()
        np.testing.assert_allclose(t.fit, V @ (b * (V.T @ t.y)), rtol=0, atol=1e-10, err_msg=f"step {tau}")
    # B_tau -> B_inf = alpha D (alpha D + lambda)^-1 (geometrically; 400 steps are plenty)
    np.testing.assert_allclose(b_recursion(d, t.args.lambd, alpha, 400)[-1], b_limit(d, t.args.lambd, alpha),
                               rtol=0, atol=1e-10)


def test_b_recursion_on_random_spectra():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, lam, alpha = 7, rng.uniform(0.01, 1), rng.uniform(0, 1)
        X = rng.normal(size=(n, 2))
        K = rbf_kernel(X, X, gamma=rng.uniform(0.1, 2))
        y = rng.normal(size=n)
        d, V = np.linalg.eigh(K)
        A = K @ np.linalg.inv(K + lam * np.eye(n))
        fit = A @ y
        for b in b_recursion(d, lam, alpha, 5)[1:]:
            fit = A @ distill_target(y, fit, alpha)
            np.testing.assert_allclose(fit, V @ (b * (V.T @ y)), rtol=0, atol=1e-10)


def test_closed_form_alpha_matches_the_grid_argmin():
    t = KRRSelfDistillTrainer(SelfDistillConfig(alpha="0.35"))
    t.step()  # the teacher
    a_star = optimal_alpha(t.A, t.y, t.fit, t.truth)
    grid = np.round(np.arange(-2.0, 2.0005, 0.001), 3)
    errors = [np.sum((t.A @ distill_target(t.y, t.fit, a) - t.truth) ** 2) for a in grid]
    assert abs(a_star - grid[int(np.argmin(errors))]) <= 1e-3
    assert a_star == pytest.approx(-0.7835, abs=1e-4)  # the value measured on the toy (outside [0, 1])


def test_closed_form_alpha_on_random_problems():
    rng = np.random.default_rng(1)
    for _ in range(5):
        n = 9
        A = rng.normal(size=(n, n))
        y, prev, ref = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
        a_star = optimal_alpha(A, y, prev, ref)
        err = lambda a: np.sum((A @ distill_target(y, prev, a) - ref) ** 2)  # noqa: E731
        assert err(a_star) <= min(err(a_star - 1e-4), err(a_star + 1e-4))


def test_auto_alpha_is_clipped_and_the_raw_value_logged(tmp_path):
    t = KRRSelfDistillTrainer(SelfDistillConfig(alpha="auto", max_steps=3, output_dir=str(tmp_path)))
    final = t.train(verbose=False)
    assert [h["alpha_raw"] for h in t.history][1] == pytest.approx(-0.7835, abs=1e-4)
    assert math.isnan(t.alphas_raw[0]) and t.alphas_raw[1] == pytest.approx(-0.7835, abs=1e-4)
    assert t.alphas[1] == 0.0 and all(0.0 <= a <= 1.0 for a in t.alphas)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "curves.png").is_file() and final["step"] == 3


def test_resume_through_the_cli_continues_the_same_run(tmp_path):
    from posttrain.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "self_distill/krr_toy", "--output_dir", str(full)]) == 0
    # a run stopped after 3 of its 6 steps (max_steps is part of the saved config, so it is stopped by hand)
    half = KRRSelfDistillTrainer(SelfDistillConfig(alpha="0.35", max_steps=6, output_dir=str(part)))
    for _ in range(3):
        half.step()
    half.save()
    assert main(["train", "self_distill/krr_toy", "--output_dir", str(part), "--resume"]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["final"]["loss_to_truth"] == b["final"]["loss_to_truth"] and b["final"]["step"] == 6
    assert [h["loss_to_truth"] for h in a["history"][3:]] == [h["loss_to_truth"] for h in b["history"]]
    with pytest.raises(ValueError, match="lambd"):
        KRRSelfDistillTrainer(SelfDistillConfig(alpha="0.35", lambd=0.3)).load_state_dict(half.state_dict())


@pytest.mark.parametrize("bad", [dict(alpha="1.5"), dict(alpha="x"), dict(lambd=0.0), dict(max_steps=0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SelfDistillConfig(**bad)


# --- the LLM loss ---------------------------------------------------------------------------------------------

def _hand_loss(logits, teacher_logits, labels, alpha, denom=None):
    """-sum_v q_v log p_v token by token, q = alpha onehot + (1 - alpha) softmax(teacher), plain Python loops."""
    total, count = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T - 1):
            label = int(labels[b, t + 1])
            if label == -100:
                continue
            z = [float(v) for v in logits[b, t]]
            m = max(z)
            logZ = m + math.log(sum(math.exp(v - m) for v in z))
            zt = [float(v) for v in teacher_logits[b, t]]
            mt = max(zt)
            et = [math.exp(v - mt) for v in zt]
            q = [(1 - alpha) * e / sum(et) + (alpha if v == label else 0.0) for v, e in enumerate(et)]
            total += -sum(qv * (zv - logZ) for qv, zv in zip(q, z))
            count += 1
    return total / (denom if denom is not None else count)


def test_mixed_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3], labels[1, 1] = -100, -100
    for alpha in (0.0, 0.3, 1.0):
        loss, terms = gt_mixed_distill_loss(logits, teacher, labels, alpha)
        assert loss.item() == pytest.approx(_hand_loss(logits, teacher, labels, alpha), abs=1e-5)
    loss, _ = gt_mixed_distill_loss(logits, teacher, labels, 0.3, num_items_in_batch=11)
    assert loss.item() == pytest.approx(_hand_loss(logits, teacher, labels, 0.3, denom=11), abs=1e-5)
    # alpha = 1 is the causal-LM cross-entropy
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert gt_mixed_distill_loss(logits, teacher, labels, 1.0)[0].item() == pytest.approx(ce.item(), abs=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        gt_mixed_distill_loss(logits, teacher[..., :6], labels, 0.5)

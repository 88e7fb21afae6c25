"""Self-distillation with ground-truth mixing: the official toy's table, the B recursion, the closed-form alpha*,
and the LLM loss (hand computation; alpha = 1 is stock SFT)."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.self_distill import (
    KRRSelfDistillTrainer,
    SelfDistillConfig,
    b_limit,
    b_recursion,
    distill_target,
    gt_mixed_distill_loss,
    optimal_alpha,
    rbf_kernel,
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
    np.testing.assert_allclose(
        b_recursion(d, t.args.lambd, alpha, 400)[-1], b_limit(d, t.args.lambd, alpha), rtol=0, atol=1e-10
    )


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
        err = lambda a, A=A, y=y, prev=prev, ref=ref: np.sum((A @ distill_target(y, prev, a) - ref) ** 2)  # noqa: E731
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


# --- the loss inside TRL's SFT on the tiny model ------------------------------------------------------------------


def _sft(overrides):
    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    return build_trainer(load_recipe("sft/tiny", {"max_steps": 1, "per_device_train_batch_size": 2, **overrides}))


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A real teacher: the tiny Qwen3 with perturbed weights (so its distribution differs from the student's)."""
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:qwen3"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g) if p.numel() > 1 else 0)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    return out


def test_alpha_one_is_stock_sft(tmp_path):
    stock = _sft({"output_dir": str(tmp_path / "a")})
    mixed = _sft({"output_dir": str(tmp_path / "b"), "self_distill_alpha": 1.0, "self_distill_teacher": "tiny:qwen3"})
    assert type(mixed).__name__ == "SelfDistillSFTTrainer" and mixed.teacher is None
    batch = next(iter(stock.get_train_dataloader()))
    loss_a, grads_a = _loss_and_grads(stock, batch)
    loss_b, grads_b = _loss_and_grads(mixed, batch)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # and the mixed loss itself at alpha = 1 is TRL's SFT loss (same tokens, same normalisation)
    logits = stock.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    own, _ = gt_mixed_distill_loss(logits, logits, batch["labels"], 1.0)
    assert own.item() == pytest.approx(loss_a.item(), abs=1e-5)


def test_a_real_teacher_changes_the_loss_as_the_formula_says(tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM

    trainer = _sft({"output_dir": str(tmp_path), "self_distill_alpha": 0.3, "self_distill_teacher": str(teacher_dir)})
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student = trainer.model(**inputs).logits
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()(**inputs).logits
    assert not torch.allclose(student, teacher, atol=1e-2)  # a teacher that differs
    assert loss == pytest.approx(_hand_loss(student, teacher, batch["labels"], 0.3), abs=1e-4)
    stock = _hand_loss(student, teacher, batch["labels"], 1.0)
    assert abs(loss - stock) > 1e-3  # the teacher term moved it
    logged = trainer._metrics["eval"]
    assert logged["self_distill/ce_ground_truth"][-1] == pytest.approx(stock, abs=1e-4)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"self_distill_alpha": "auto", "self_distill_teacher": "tiny:qwen3"}, "no sound meaning for an LLM"),
        ({"self_distill_alpha": 1.5, "self_distill_teacher": "tiny:qwen3"}, r"must be in \[0, 1\]"),
        ({"self_distill_alpha": 0.5}, "needs self_distill_teacher"),
        ({"self_distill_teacher": "tiny:qwen3"}, "needs self_distill_alpha"),
    ],
)
def test_bad_self_distill_keys_are_one_clear_error(over, message):
    from posttrain import RecipeError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("sft/tiny", over)
    with pytest.raises(RecipeError, match="'sft' recipes only"):
        load_recipe("dpo/tiny", {"self_distill_alpha": 0.5, "self_distill_teacher": "tiny:qwen3"})


def test_a_teacher_with_another_vocabulary_is_refused_before_the_student_loads(tmp_path, teacher_dir):
    import shutil

    from posttrain import UserError

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="vocab_size"):
        _sft({"output_dir": str(tmp_path / "run"), "self_distill_alpha": 0.5, "self_distill_teacher": str(other)})

"""DONE: the KL-DRO closed form and its compositional gradient, PGD, the minority-blobs experiment (5 seeds, DONE
against uniform PGD-AT), resume, and the reweighting inside TRL's SFT on the tiny model."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.done import (
    DONEConfig,
    DONETrainer,
    KLDROReweight,
    compare_arms,
    effective_sample_size,
    kl_dro_objective,
    kl_dro_sequence_loss,
    kl_dro_weights,
    pgd_attack,
    reweighted_loss,
    update_log_u,
)

torch.set_num_threads(1)


def test_closed_form_weights_on_a_worked_example():
    losses = torch.tensor([0.0, math.log(2.0), math.log(3.0)], dtype=torch.float64)
    torch.testing.assert_close(kl_dro_weights(losses, 1.0), torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    assert float(kl_dro_objective(losses, 1.0)) == pytest.approx(math.log(2.0))  # log((1 + 2 + 3) / 3)
    assert effective_sample_size(torch.ones(5)) == pytest.approx(5.0)
    assert effective_sample_size(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)


def test_closed_form_is_the_maximiser_on_random_losses():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, r = 7, rng.uniform(0.2, 3)
        losses = torch.tensor(rng.exponential(size=n))

        def value(w, losses=losses, r=r, n=n):
            return float(w @ losses - r * (w * torch.log(w * n)).sum())

        best = value(kl_dro_weights(losses, r))
        assert best == pytest.approx(float(kl_dro_objective(losses, r)), abs=1e-10)
        for _ in range(50):
            assert value(torch.tensor(rng.dirichlet(np.ones(n)))) <= best + 1e-12


def test_reweighted_gradient_is_the_compositional_gradient():
    """With u the exact batch mean (beta = 1), d/dtheta mean[exp(l/r)/u] l = d/dtheta r log mean exp(l/r)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 4, dtype=torch.float64, generator=g)
    for r in (0.5, 2.0):
        losses = (x @ theta - 0.3) ** 2
        log_u = update_log_u(None, losses, r, 1.0)
        (mine,) = torch.autograd.grad(reweighted_loss(losses, log_u, r)[0], theta)
        (ref,) = torch.autograd.grad(kl_dro_objective((x @ theta - 0.3) ** 2, r), theta)
        torch.testing.assert_close(mine, ref)


def test_moving_average_of_u_in_log_space():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    log_u = update_log_u(None, a, 1.0, 0.5)
    assert math.exp(log_u) == pytest.approx((1 + math.e**2) / 2)
    log_u = update_log_u(log_u, b, 1.0, 0.5)
    assert math.exp(log_u) == pytest.approx(0.5 * (1 + math.e**2) / 2 + 0.5 * math.e)
    big = torch.tensor([2000.0, 1990.0])  # exp(2000) overflows a float; log u does not
    assert math.isfinite(update_log_u(update_log_u(None, big, 1.0, 0.5), big, 1.0, 0.5))
    rw = KLDROReweight(1.0, 0.5)
    loss, info = rw(big)
    assert torch.isfinite(loss) and 0.5 < info["ess_frac"] <= 1


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    delta = pgd_attack(model, x, y, 0.1, 5)
    assert float(delta.abs().max()) <= 0.1 + 1e-7
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model(x + delta), y)) > float(ce(model(x), y)) + 1e-3


# --- the minority-blobs experiment: 5 seeds, both arms ---------------------------------------------------------


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    return compare_arms(output_dir=str(tmp_path_factory.mktemp("done")))


def test_done_lifts_the_worst_class_on_four_of_five_seeds(arms):
    gains = [d["worst_class_robust_acc"] - a["worst_class_robust_acc"] for a, d in zip(arms["at"], arms["done"])]
    assert sum(g >= 0.03 - 1e-9 for g in gains) >= 4, gains


def test_done_keeps_the_average_robust_accuracy(arms):
    at = np.mean([a["robust_acc"] for a in arms["at"]])
    done = np.mean([d["robust_acc"] for d in arms["done"]])
    assert done >= at - 0.01, (done, at)


def test_done_weights_do_not_collapse(arms):
    assert min(d["min_ess_frac"] for d in arms["done"]) > 0.2


def test_resume_through_the_cli_continues_the_same_run(tmp_path):
    from posttrain.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--max_steps", "12", "--eval_every", "4"]
    assert main(["train", "done/blobs_done", "--output_dir", str(full), *common]) == 0
    half = DONETrainer(
        DONEConfig(reweight=True, r=1.0, beta=0.5, epsilon=0.15, max_steps=12, eval_every=4, output_dir=str(part))
    )
    for _ in range(6):
        half.step()
    half.save()
    assert main(["train", "done/blobs_done", "--output_dir", str(part), "--resume", *common]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["final"]["robust_acc"] == b["final"]["robust_acc"] and b["final"]["step"] == 12
    assert a["history"][-1]["batch_u"] == pytest.approx(b["history"][-1]["batch_u"], rel=1e-12)


@pytest.mark.parametrize("bad", [dict(r=0.0), dict(beta=0.0), dict(beta=1.5), dict(epsilon=-1.0), dict(n_train=5)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        DONEConfig(**bad)


# --- the reweighting inside TRL's SFT on the tiny model ------------------------------------------------------


def _hand_loss(logits, labels, r, log_u):
    """sum over labelled tokens of exp(l_seq / r - log u) * ce / token count, plain Python loops."""
    B, T, V = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        ces = []
        for t in range(T - 1):
            label = int(labels[b, t + 1])
            if label == -100:
                continue
            z = [float(v) for v in logits[b, t]]
            m = max(z)
            ces.append(m + math.log(sum(math.exp(v - m) for v in z)) - z[label])
        if ces:
            w = math.exp(sum(ces) / len(ces) / r - log_u)
            total += w * sum(ces)
            count += len(ces)
    return total / count


def test_sequence_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 6, 7, generator=g)
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, 2:] = -100
    labels[2, :] = -100  # no labelled token: no weight, no say in u
    rw = KLDROReweight(0.7, 1.0)
    loss, info = kl_dro_sequence_loss(logits, labels, rw)
    assert loss.item() == pytest.approx(_hand_loss(logits, labels, 0.7, rw.log_u), abs=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert abs(loss.item() - ce.item()) > 1e-3  # the weights moved it
    huge = KLDROReweight(1e9, 0.5)
    assert kl_dro_sequence_loss(logits, labels, huge)[0].item() == pytest.approx(ce.item(), abs=1e-6)


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


def test_kl_dro_sft_reduces_to_stock_sft_and_reweights_otherwise(tmp_path):
    stock = _sft({"output_dir": str(tmp_path / "a")})
    flat = _sft({"output_dir": str(tmp_path / "b"), "kl_dro_r": 1e9})
    assert type(flat).__name__ == "KLDROSFTTrainer"
    batch = next(iter(stock.get_train_dataloader()))
    loss_a, grads_a = _loss_and_grads(stock, batch)
    loss_b, grads_b = _loss_and_grads(flat, batch)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)
    dro = _sft({"output_dir": str(tmp_path / "c"), "kl_dro_r": 0.5, "kl_dro_beta": 1.0})
    loss_c, _ = _loss_and_grads(dro, batch)
    with torch.no_grad():
        logits = dro.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert loss_c.item() == pytest.approx(_hand_loss(logits, batch["labels"], 0.5, dro.kl_dro.log_u), abs=1e-4)
    assert abs(loss_c.item() - loss_a.item()) > 1e-3  # the weights moved it
    assert dro._metrics["train"]["kl_dro/ess_frac"][-1] < 1.0
    state = dro.method_state()
    fresh = _sft({"output_dir": str(tmp_path / "d"), "kl_dro_r": 0.5, "kl_dro_beta": 1.0})
    fresh.load_method_state(state)
    assert fresh.kl_dro.log_u == dro.kl_dro.log_u


def test_done_tiny_recipe_trains_and_checkpoints_u(tmp_path):
    from posttrain.cli import main

    out = tmp_path / "run"
    assert main(["train", "done/tiny", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps",
                 "--save_steps", "2"]) == 0  # fmt: skip
    state = torch.load(out / "checkpoint-2" / "method_state.pt", weights_only=False)
    assert math.isfinite(state["trainer"]["log_u"])


@pytest.mark.parametrize(
    "over, message",
    [
        ({"kl_dro_r": 0.0}, "r must be a number > 0"),
        ({"kl_dro_r": 1.0, "kl_dro_beta": 2.0}, r"beta must be in \(0, 1\]"),
        ({"kl_dro_beta": 0.5}, "needs kl_dro_r"),
        ({"kl_dro_rr": 1.0}, "unknown key 'kl_dro_rr'"),
        ({"kl_dro_r": 1.0, "self_distill_alpha": 1.0}, "both replace the SFT loss"),
    ],
)
def test_bad_kl_dro_keys_are_one_clear_error(over, message):
    from posttrain import RecipeError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("sft/tiny", over)
    with pytest.raises(RecipeError, match="'sft' recipes only"):
        load_recipe("dpo/tiny", {"kl_dro_r": 1.0})

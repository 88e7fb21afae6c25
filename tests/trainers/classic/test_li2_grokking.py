"""Li2 grokking: the memorisation / generalisation pass criteria on Z_23, the statistics on worked examples, resume."""

import math

import numpy as np
import pytest
import torch
from support import assert_refused

from posttrain.trainers.classic.li2_grokking import (
    Li2GrokkingConfig,
    Li2GrokkingTrainer,
    backprop_grad_norm,
    critical_fraction,
    first_step_reaching,
    fourier_concentration,
    group_table,
    kernel_offdiag_ratio,
)

torch.set_num_threads(1)


def test_grokking_needs_enough_samples_and_builds_fourier_features(tmp_path):
    """M = 23, K = 256, Adam (1e-3, wd 1e-4), full batch, 3000 epochs: below the critical fraction (0.375) the
    network memorises, above it it generalises with Fourier features."""
    assert critical_fraction(23) == pytest.approx(0.375, abs=1e-3)
    final = {}
    for f in (0.15, 0.7):
        cfg = Li2GrokkingConfig(
            moduli=[23],
            hidden_size=256,
            train_fraction=f,
            max_steps=3000,
            eval_every=500,
            output_dir=str(tmp_path / str(f)),
        )
        final[f] = Li2GrokkingTrainer(cfg).train(verbose=False)
        assert final[f]["stopped_by"] == "max_steps"
    low, high = final[0.15], final[0.7]
    assert low["train_acc"] == 1.0 and low["test_acc"] <= 0.1, low  # memorisation only
    assert high["test_acc"] >= 0.9 and high["fourier_concentration"] >= 0.5, high
    assert high["fourier_concentration"] - low["fourier_concentration"] >= 0.2, (low, high)


def test_group_table_is_the_group_law():
    a, b, c = group_table([5])
    assert len(a) == 25 and np.array_equal(c, (a + b) % 5)
    a, b, c = group_table([2, 3])  # Z_2 x Z_3: element i = (i // 3, i % 3)
    for i, j, k in zip(a, b, c):
        assert k == ((i // 3 + j // 3) % 2) * 3 + (i % 3 + j % 3) % 3
    # an abelian group: commutative, identity 0, every element has an inverse
    table = c.reshape(6, 6)
    assert np.array_equal(table, table.T) and np.array_equal(table[0], np.arange(6))
    assert all((row == 0).sum() == 1 for row in table)


def test_fourier_concentration_worked_examples():
    M, x = 23, np.arange(23)
    pure = np.stack([np.cos(2 * np.pi * 3 * x / M + 0.7), np.sin(2 * np.pi * 5 * x / M) + 4.0])  # DC does not count
    assert fourier_concentration(pure, [M]) == pytest.approx(1.0)
    two = np.cos(2 * np.pi * 2 * x / M) + 0.5 * np.cos(2 * np.pi * 7 * x / M)  # energies 1 : 0.25
    assert fourier_concentration(two[None], [M]) == pytest.approx(1 / 1.25)
    # white noise: about the expected maximum share of 11 conjugate pairs, far below 0.5
    noise = np.random.default_rng(0).standard_normal((2000, M))
    assert 0.2 < fourier_concentration(noise, [M]) < 0.33
    # a character of Z_2 x Z_3 (on the flattened element index) is one feature; Z_2's sign flip pairs with itself
    g = np.array([(-1) ** (i // 3) for i in range(6)], dtype=float)
    assert fourier_concentration(g[None], [2, 3]) == pytest.approx(1.0)
    mix = g + np.cos(2 * np.pi * (np.arange(6) % 3) / 3)  # energies: 36 on (1,0); 9 + 9 on the pair (0,+-1)
    assert fourier_concentration(mix[None], [2, 3]) == pytest.approx(36 / 54)


def test_backprop_grad_norm_and_kernel_ratio_on_random_inputs():
    rng = torch.Generator().manual_seed(0)
    feats, V, Y = torch.randn(7, 4, generator=rng), torch.randn(3, 4, generator=rng), torch.randn(7, 3, generator=rng)
    # G_F is minus the gradient of 1/2 ||Y - F V^T||^2 with respect to F
    f = feats.clone().requires_grad_(True)
    (0.5 * (Y - f @ V.T).square().sum()).backward()
    assert backprop_grad_norm(feats, V, Y) == pytest.approx(float(f.grad.norm()), rel=1e-5)
    assert backprop_grad_norm(feats, torch.linalg.lstsq(feats, Y).solution.T, Y) < backprop_grad_norm(feats, V, Y)
    # orthogonal rows: F F^T is diagonal; after the column centring the off-diagonal is -d/n, the diagonal d(1-1/n)
    assert kernel_offdiag_ratio(torch.eye(5) * 2.0) == pytest.approx((1 / 5) / (4 / 5))
    same = torch.ones(6, 3) + torch.randn(6, 3, generator=rng) * 1e-3  # identical rows: nothing left after centring
    assert kernel_offdiag_ratio(torch.randn(40, 200, generator=rng)) < 0.2
    assert math.isfinite(kernel_offdiag_ratio(same))


def test_first_step_reaching():
    history = [{"step": 100, "test_acc": 0.2}, {"step": 200, "test_acc": 0.95}, {"step": 300, "test_acc": 0.99}]
    assert (
        first_step_reaching(history, "test_acc", 0.9) == 200 and first_step_reaching(history, "test_acc", 1.0) is None
    )


class KilledAt27(Li2GrokkingTrainer):
    def training_step(self):
        if self.global_step == 27:
            raise KeyboardInterrupt
        return super().training_step()


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_resume_continues_exactly(optimizer, tmp_path):
    cfg = dict(
        moduli=[7], hidden_size=16, train_fraction=0.6, max_steps=40, eval_every=10, save_every=10, optimizer=optimizer
    )
    full = Li2GrokkingTrainer(Li2GrokkingConfig(**cfg, output_dir=str(tmp_path / "full")))
    expected = full.train(verbose=False)
    cut = KilledAt27(Li2GrokkingConfig(**cfg, output_dir=str(tmp_path / "cut")))
    with pytest.raises(KeyboardInterrupt):
        cut.train(verbose=False)
    assert cut.last_saved_step == 20
    resumed = Li2GrokkingTrainer(Li2GrokkingConfig(**cfg, output_dir=str(tmp_path / "cut")))
    final = resumed.train(verbose=False, resume=True)
    assert final["test_loss"] == expected["test_loss"] and torch.equal(resumed.W, full.W)
    assert resumed.history == full.history
    if optimizer == "muon":
        assert isinstance(resumed.optimizers[0], torch.optim.Muon)
        assert torch.equal(
            resumed.optimizers[0].state[resumed.W]["momentum_buffer"],
            full.optimizers[0].state[full.W]["momentum_buffer"],
        )


def test_config_errors():
    for bad, word in (
        (dict(moduli=[1]), "moduli"),
        (dict(train_fraction=1.0), "train_fraction"),
        (dict(optimizer="lion"), "optimizer"),
        (dict(activation="tanh"), "activation"),
        (dict(loss="hinge"), "loss"),
        (dict(max_steps=0), "max_steps"),
    ):
        with pytest.raises(ValueError, match=word):
            Li2GrokkingConfig(**bad)


def test_recipe_runs_from_the_cli_and_bad_values_are_one_line(tmp_path, capsys):
    import json

    from posttrain.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "li2_grokking/z23_muon",
                "--max_steps",
                "20",
                "--eval_every",
                "10",
                "--hidden_size",
                "32",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "li2_grokking" and [h["step"] for h in results["history"]] == [10, 20]
    assert (out / "curves.png").exists() and (out / "aux_state.pt").exists()
    argv = ["train", "li2_grokking/z23_adam", "--optimizer", "lion"]
    assert "valid: adam, sgd, muon" in assert_refused(argv, "unknown optimizer 'lion'", capsys, tmp_path / "x")

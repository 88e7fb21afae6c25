"""TangleNAS: the weight mixture and the parameter expectation on worked examples and random inputs, the supernet
at a one-hot choice is exactly the child it hands on, the digits experiment's pass criteria (3 seeds), resume,
and the recipe from the CLI."""

import itertools
import json

import pytest
import torch
from support import assert_refused

from posttrain.trainers.classic.nas_space import arch_weights, digits_splits
from posttrain.trainers.classic.tanglenas import (
    EntangledMLP,
    SeparateMLP,
    TangleNASConfig,
    TangleNASTrainer,
    child_params,
    entangled_weight,
    enumerate_space,
    expected_params,
    memory_ratio,
    ranks,
    search,
)

torch.set_num_threads(1)
WIDTHS, SEEDS = [16, 64, 128], (0, 1, 2)


def test_entangled_weight_is_the_mixture_of_leading_slices():
    w = torch.arange(12.0).reshape(4, 3)  # worked example: widths 1, 2, 4 of a 4-row weight
    a = torch.tensor([0.5, 0.3, 0.2])
    expected = torch.stack([w[0], 0.5 * w[1], 0.2 * w[2], 0.2 * w[3]])  # row r: the a_i of the d_i > r
    torch.testing.assert_close(entangled_weight(w, a, [1, 2, 4]), expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        w, b = torch.randn(128, 37, generator=g), torch.randn(128, generator=g)
        a = torch.softmax(torch.randn(3, generator=g), -1)
        rows = torch.arange(128)
        mask = sum(a[i] * (rows < d).float() for i, d in enumerate(WIDTHS))  # the row-mask form
        torch.testing.assert_close(entangled_weight(w, a, WIDTHS), mask[:, None] * w)
        torch.testing.assert_close(entangled_weight(b, a, WIDTHS), mask * b)


def test_expected_params_is_the_exact_expectation():
    assert child_params((16, 16)) == 65 * 16 + 17 * 16 + 17 * 10 == 1482
    assert child_params((128, 128)) == 65 * 128 + 129 * 128 + 129 * 10
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = [torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), -1) for _ in range(2)]
        brute = sum(
            a[0][i] * a[1][j] * child_params((d1, d2))
            for (i, d1), (j, d2) in itertools.product(enumerate(WIDTHS), repeat=2)
        )
        assert float(expected_params(a, WIDTHS)) == pytest.approx(float(brute), rel=1e-12)


def test_samplers():
    alpha = torch.tensor([[0.1, -0.3, 2.0]], requires_grad=True)
    torch.testing.assert_close(arch_weights(alpha, "darts"), torch.softmax(alpha, -1))
    g = torch.Generator().manual_seed(0)
    hard = arch_weights(alpha, "gdas", tau=1.0, generator=g)
    assert set(hard.detach().flatten().tolist()) <= {0.0, 1.0} and hard.sum().item() == 1.0
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert alpha.grad.abs().sum() > 0  # straight-through: the gradient reaches alpha
    torch.manual_seed(0)
    d = arch_weights(alpha, "drnas")
    assert d.sum().item() == pytest.approx(1.0) and (d > 0).all()
    with pytest.raises(ValueError, match="sampler"):
        arch_weights(alpha, "enas")


@pytest.mark.parametrize("net_cls", [EntangledMLP, SeparateMLP])
def test_supernet_at_a_one_hot_choice_is_the_child_it_hands_on(net_cls):
    torch.manual_seed(0)
    net, x = net_cls(WIDTHS, 2), torch.rand(5, 64)
    for arch in itertools.product(WIDTHS, repeat=2):
        a = torch.stack([torch.nn.functional.one_hot(torch.tensor(WIDTHS.index(d)), 3).float() for d in arch])
        torch.testing.assert_close(net(x, a), net.child(arch)(x), atol=1e-6, rtol=1e-5)


def test_memory_entangled_parameters_and_units():
    m = memory_ratio(WIDTHS, 2)
    assert m["params_tanglenas"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10 == 26122
    assert m["params_darts"] == 64 * 208 + 208 + 128 * 208 + 208 + 128 * 10 + 10 == 41642
    assert m["unit_ratio"] == 128 / 208


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced as stated: entangled / separate is 26122 / 41642 = 0.627 parameters and 128 / 208 = 0.615 "
    "units per layer, both above the proposed 0.6 (the criterion's own arithmetic, 128 vs 16+64+128, gives 0.615)",
)
def test_memory_criterion_at_most_0_6_of_darts():
    assert memory_ratio(WIDTHS, 2)["param_ratio"] <= 0.6


@pytest.fixture(scope="module")
def experiment():
    """The digits experiment at its full size: 300 iterations, 3 seeds, and the 9 architectures retrained."""
    runs = {}
    for seed in SEEDS:
        space = enumerate_space(WIDTHS, 2, digits_splits(seed), 300, seed)
        found = search(seed, output_dir="unused")
        runs[seed] = (space, found)
    return runs


def test_argmax_retrains_within_1pp_of_the_best_and_ranks_top3(experiment):
    top3 = 0
    for seed, (space, found) in experiment.items():
        arch = tuple(int(d) for d in found["argmax_arch"].split("-"))
        assert found["retrain_test_acc"] == space[arch]  # the same retraining, so the same number
        assert found["retrain_test_acc"] >= max(space.values()) - 0.01, (seed, arch, space)
        top3 += ranks(space)[arch] <= 3
    assert top3 >= 2, experiment


def test_resume_continues_the_same_trajectory(tmp_path):
    """Killed after step 4 (saved at 3), resumed from aux_state.pt: the same alpha, weights, history and final numbers
    (the DrNAS sampler draws from torch's global generator, which the state restores)."""

    class KilledAt4(TangleNASTrainer):
        def step(self):
            if self.global_step == 4:
                raise KeyboardInterrupt
            return super().step()

    cfg = dict(max_steps=6, save_every=3, eval_every=3, sampler="drnas", retrain_steps=2)
    full = TangleNASTrainer(TangleNASConfig(**cfg, output_dir=str(tmp_path / "full")))
    expected = full.train(verbose=False)
    with pytest.raises(KeyboardInterrupt):
        KilledAt4(TangleNASConfig(**cfg, output_dir=str(tmp_path / "cut"))).train(verbose=False)
    resumed = TangleNASTrainer(TangleNASConfig(**cfg, output_dir=str(tmp_path / "cut")))
    final = resumed.train(verbose=False, resume=True)
    assert {k: v for k, v in final.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}
    assert resumed.history == full.history and torch.equal(full.alpha, resumed.alpha)
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(arm="oneshot"), "arm"),
        (dict(sampler="snas"), "sampler"),
        (dict(widths=[64, 16]), "widths"),
        (dict(widths=[64]), "widths"),
        (dict(kappa=-1.0), "kappa"),
        (dict(layers=0), "layers"),
    ],
)
def test_bad_config_is_refused(bad, word):
    with pytest.raises(ValueError, match=word):
        TangleNASConfig(**bad)


def test_recipe_runs_from_the_cli_and_bad_values_are_one_line(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "run"
    argv = ["train", "tanglenas/digits_darts", "--max_steps", "10", "--eval_every", "5", "--retrain_steps", "5"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "tanglenas" and [h["step"] for h in results["history"]] == [5, 10]
    assert "retrain_test_acc" in results["final"] and (out / "curves.png").exists()
    assert_refused(["train", "tanglenas/digits", "--sampler", "snas"], "sampler", capsys, tmp_path / "x")
    assert main(["list"]) == 0
    assert "tanglenas/digits_darts" in capsys.readouterr().out

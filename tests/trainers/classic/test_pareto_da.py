"""ParetoDA: the target-guided LPs on worked examples and random gradients, the LP-failure fallback, TCM, the
gradient reversal, resume through the CLI, and the digits experiment: the shift controls (an unshifted target scores
as the source; an inverted one below chance), and source-only vs DANN vs ParetoDA on 30-degree rotated digits at
STEPS iterations, 3 seeds (``experiments/pareto_da.py`` runs the 1500-iteration versions)."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.trainers.classic.multi_objective import (
    EPOWeighting,
    guided_lp_rhs,
    objective_gradients,
    target_guided_alpha,
)
from posttrain.trainers.classic.pareto_da import (
    ParetoDAConfig,
    ParetoDATrainer,
    compare_arms,
    grad_reverse,
    grl_coefficient,
    tcm_loss,
    tcm_rho,
)

torch.set_num_threads(1)


def test_guided_rhs_on_a_worked_example():
    np.testing.assert_array_equal(guided_lp_rhs(np.array([0.5, -0.2, 0.3])), [0.0, -0.2, -np.inf])
    np.testing.assert_array_equal(guided_lp_rhs(np.array([-0.5, -0.2])), [0.0, 0.0])


def test_guided_lp_follows_the_guide():
    G = np.eye(3)
    res = target_guided_alpha(G, np.array([0.2, 1.0, -0.5]), loss_val=1.0)
    assert res.move == "guided" and res.success
    np.testing.assert_allclose(res.alpha, [0, 1, 0], atol=1e-9)


def test_dominance_lp_on_a_worked_example():
    # C = diag(1, 4): max alpha_1 + 4 alpha_2 on the simplex -> alpha = (0, 1); alpha.c = 0 >= min(max c, 0) = 0
    res = target_guided_alpha(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([1.0, 0.0]), loss_val=-0.5)
    assert res.move == "dominance" and res.success
    np.testing.assert_allclose(res.alpha, [0, 1], atol=1e-9)


def test_infeasible_lp_falls_back_to_the_preference():
    # c = (0, -0.1): the restriction forces alpha = e_1, whose direction ascends objective 2 (C e_1 = (1, -1))
    res = target_guided_alpha(np.array([[1.0, 0.0], [-1.0, 0.1]]), np.array([0.0, -1.0]), 0.0, preference=[0.3, 0.7])
    assert not res.success
    np.testing.assert_allclose(res.alpha, [0.3, 0.7])


def test_random_gradients_give_simplex_weights_and_descent_directions():
    rng = np.random.default_rng(0)
    for scale in (1e-6, 1.0, 1e4):  # the common rescaling keeps HiGHS away from tiny coefficients
        for _ in range(10):
            G = scale * (rng.normal(size=(3, 50)) + rng.normal(size=50))  # correlated objectives
            g_val = scale * rng.normal(size=50)
            for loss_val in (1.0, -1.0):
                res = target_guided_alpha(G, g_val, loss_val)
                assert res.alpha.min() >= 0 and res.alpha.sum() == pytest.approx(1.0)
                if res.success and res.move == "dominance":
                    assert (G @ (G.T @ res.alpha) >= -1e-7 * scale**2).all()  # descends every objective


def test_objective_gradients_and_the_weighting():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    losses = [(w**2).sum(), (w - 1).abs().sum(), w.sum()]
    G = objective_gradients(losses, [w])
    torch.testing.assert_close(G, torch.stack([2 * w, torch.sign(w - 1), torch.ones(4)]).detach())
    weighting = EPOWeighting(3)
    loss, res = weighting(losses, [w], (w - 0.5).pow(2).sum())
    assert loss.item() == pytest.approx(
        3 * sum(a * float(v) for a, v in zip(res.alpha, [float(v.detach()) for v in losses])), rel=1e-6
    )
    with pytest.raises(ValueError, match="preference"):
        EPOWeighting(3, preference=[0.5, 0.5])


def test_tcm_on_worked_examples():
    assert float(tcm_loss(torch.full((4, 5), 0.2))) == pytest.approx(0.0, abs=1e-7)  # no information
    assert float(tcm_loss(torch.eye(5))) == pytest.approx(-math.log(5))  # confident and balanced: the minimum
    rho = tcm_rho(torch.zeros(2, 3), torch.tensor([[1.0, 0.5, 0.5], [0.2, 0.2, 0.6]]))
    torch.testing.assert_close(rho, torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.7).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -0.7))
    assert grl_coefficient(0, 1000) == 0.0 and grl_coefficient(5000, 1000) == pytest.approx(1 - 2 / (1 + math.e**10))


def test_short_paretoda_run_on_the_proposed_target_writes_its_results(tmp_path):
    trainer = ParetoDATrainer(ParetoDAConfig(max_steps=100, eval_every=50, output_dir=str(tmp_path)))
    final = trainer.train(verbose=False)
    assert final["step"] == 100 and trainer.weighting.steps == 100
    assert trainer.alpha_min >= 0 and trainer.alpha_sum_err < 1e-6
    assert trainer.weighting.failures / trainer.weighting.steps < 0.05
    assert (tmp_path / "results.json").is_file() and (tmp_path / "curves.png").is_file()


def test_resume_through_the_cli_continues_the_same_run(tmp_path):
    from posttrain.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--max_steps", "10", "--eval_every", "5"]
    assert main(["train", "pareto_da/digits_paretoda", "--output_dir", str(full), *common]) == 0
    half = ParetoDATrainer(ParetoDAConfig(max_steps=10, eval_every=5, output_dir=str(part)))
    for _ in range(5):
        half.step()
    half.save()
    assert main(["train", "pareto_da/digits_paretoda", "--output_dir", str(part), "--resume", *common]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["final"]["target_acc"] == b["final"]["target_acc"] and b["final"]["step"] == 10
    assert a["history"][-1]["alpha_cls"] == b["history"][-1]["alpha_cls"]


@pytest.mark.parametrize("bad", [dict(arm="cdan"), dict(val_frac=0.0), dict(learning_rate=0.0), dict(hidden=0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        ParetoDAConfig(**bad)


# --- the digits experiment ------------------------------------------------------------------------------------


def _source_only(tmp_path, **shift):
    t = ParetoDATrainer(
        ParetoDAConfig(arm="source_only", max_steps=300, eval_every=300, output_dir=str(tmp_path), **shift)
    )
    return t.train(verbose=False)


def test_an_unshifted_target_scores_as_the_source_and_an_inverted_one_below_chance(tmp_path):
    # the control behind the below-chance numbers of the rotated + inverted target: labels and evaluation are right
    # (no shift: target accuracy = source accuracy), and 1 - x is a sign-flipped centred image, which a source
    # classifier scores lowest in its own class
    plain = _source_only(tmp_path / "plain", rotate=0.0, invert=False)
    assert plain["source_acc"] > 0.85 and abs(plain["target_acc"] - plain["source_acc"]) < 0.03, plain
    inverted = _source_only(tmp_path / "inverted", rotate=0.0, invert=True)
    assert inverted["source_acc"] > 0.85 and inverted["target_acc"] < 0.05, inverted


STEPS = 300  # seed means here decide both accuracy criteria as at 1500 iterations (at 100, DANN = source-only)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pareto_da"))
    return compare_arms(rotate=30.0, invert=False, max_steps=STEPS, eval_every=STEPS, output_dir=out)


def _mean_target(runs):
    return float(np.mean([r["target_acc"] for r in runs]))


def test_dann_beats_source_only_by_two_points_on_rotated_digits(rotated):
    dann, source = _mean_target(rotated["dann"]), _mean_target(rotated["source_only"])
    assert dann > source + 0.02, (dann, source)


def test_paretoda_beats_dann_by_one_point_on_rotated_digits(rotated):
    pareto, dann = _mean_target(rotated["paretoda"]), _mean_target(rotated["dann"])
    assert pareto >= dann + 0.01, (pareto, dann)


def test_alpha_stays_on_the_simplex_and_the_direction_descends_every_objective(rotated):
    for run in rotated["paretoda"]:
        assert run["alpha_min"] >= 0 and run["alpha_sum_err"] < 1e-6, run
        # the Pareto direction: no solved step ascends an objective to first order (equal weights do, often)
        assert run["ascent_frac"] == 0, run


def test_lp_failures_stay_under_five_percent_at_this_size(rotated):
    # holds over the first 300 iterations (0.3-1 %); NOT over the 1500 of experiments/pareto_da.py (3.1, 6.4, 5.7 %
    # of the iterations on rotated digits): failures grow as the three gradients come into conflict late in training
    fractions = [r["lp_failure_frac"] for r in rotated["paretoda"]]
    assert max(fractions) < 0.05, fractions

"""ENAS, ENAS + memory buffer (UNVERIFIED loss) and random search with shared weights: the search space and the
graph edit distance on worked examples and random cells, the controller's log-probability and decoding loss, the
digits experiment's pass criteria (3 seeds), resume, and the recipe from the CLI."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import assert_refused

from posttrain.trainers.classic.enas import (
    Controller,
    ENASConfig,
    ENASTrainer,
    SharedCell,
    decision_sizes,
    describe,
    graph_edit_distance,
    loose_ends,
    reinforce_loss,
    search,
    uniform_archs,
)

torch.set_num_threads(1)
SEEDS = (0, 1, 2)
# node i: (input, op); input 0 is x, j >= 1 is node j - 1; ops tanh, relu, sigmoid, identity
CHAIN = (0, 0, 1, 1, 2, 2, 3, 3)  # x -> n0 -> n1 -> n2 -> n3
FAN = (0, 0, 0, 1, 0, 2, 0, 3)  # every node reads x


def test_search_space_and_graph_edit_distance_worked_examples():
    assert decision_sizes(4) == [1, 4, 2, 4, 3, 4, 4, 4] and np.prod(decision_sizes(4)) == 6144
    assert loose_ends(CHAIN) == [3] and loose_ends(FAN) == [0, 1, 2, 3]
    assert describe(CHAIN) == "n0=tanh(x) n1=relu(n0) n2=sigmoid(n1) n3=identity(n2) out=mean(n3)"
    assert graph_edit_distance(CHAIN, CHAIN) == 0
    assert graph_edit_distance(CHAIN, (0, 1, 1, 1, 2, 2, 3, 3)) == 1  # one op relabelled
    # n1 reads x instead of n0: edge (n0, n1) -> (x, n1), and n0 becomes a loose end: + (n0, out)
    assert graph_edit_distance(CHAIN, (0, 0, 0, 1, 2, 2, 3, 3)) == 3
    # CHAIN vs FAN: edges n0->n1, n1->n2, n2->n3 swap for x->n1, x->n2, x->n3 (6), plus n0..n2 -> out (3)
    assert graph_edit_distance(CHAIN, FAN) == 9


def test_graph_edit_distance_is_a_metric_on_random_cells():
    archs = uniform_archs(decision_sizes(4), 30, torch.Generator().manual_seed(0)).tolist()
    for a, b, c in itertools.islice(itertools.permutations(archs, 3), 2000):
        d_ab = graph_edit_distance(a, b)
        assert d_ab == graph_edit_distance(b, a) and (d_ab == 0) == (a == b)
        assert graph_edit_distance(a, c) <= d_ab + graph_edit_distance(b, c)
        assert d_ab >= sum(a[i] != b[i] for i in range(1, 8, 2))  # at least one per differing op


def test_shared_cell_runs_the_sampled_graph():
    torch.manual_seed(0)
    cell, x = SharedCell(4, 64), torch.rand(3, 64)
    n0 = torch.tanh(cell.proj[0][0](x))
    n1 = torch.sigmoid(cell.proj[1][0](x))
    n2 = cell.proj[2][1](n0)  # identity op on n0
    n3 = torch.relu(cell.proj[3][3](n2))
    expected = cell.head((n1 + n3) / 2)  # loose ends: n1, n3
    torch.testing.assert_close(cell(x, (0, 0, 0, 2, 1, 3, 3, 1)), expected)


def test_controller_log_prob_entropy_and_decode_loss():
    torch.manual_seed(0)
    sizes = decision_sizes(4)
    ctrl = Controller(sizes, 32)
    out = ctrl(6, generator=torch.Generator().manual_seed(1))
    forced = ctrl(6, actions=out["actions"])
    torch.testing.assert_close(forced["log_prob"], out["log_prob"])
    assert out["hiddens"].shape == (6, 9, 32) and (out["actions"] < torch.tensor(sizes)).all()
    # by hand: log pi(a) = sum_t log softmax(head_t(h_t))[a_t]; decode = mean over t, k < t of CE(dec_k(h_t), a_k)
    h, a = forced["hiddens"], out["actions"]
    logp = sum(F.log_softmax(ctrl.heads[t](h[:, t]), -1).gather(1, a[:, t : t + 1]).squeeze(1) for t in range(8))
    torch.testing.assert_close(forced["log_prob"], logp)
    per = [F.cross_entropy(ctrl.decoders[k](h[:, t]), a[:, k]) for t in range(1, 9) for k in range(t)]
    torch.testing.assert_close(ctrl.decode_loss(a), torch.stack(per).mean())
    # REINFORCE worked example: rewards (1, 0), baseline 0.5, log-probs (-1, -2), entropy 0 -> -(0.5*-1 - 0.5*-2)/2
    loss = reinforce_loss(torch.tensor([-1.0, -2.0]), torch.zeros(2), torch.tensor([1.0, 0.0]), 0.5, 0.1)
    assert loss.item() == pytest.approx(-0.25)


@pytest.fixture(scope="module")
def experiment():
    """The experiment: 400 alternating steps, 3 arms, 3 seeds; best of 50, correlation over 200 pairs."""
    return {
        arm: [search(arm, seed, output_dir="unused") for seed in SEEDS] for arm in ("enas", "enas_buffer", "random")
    }


def _mean(experiment, arm, key):
    return float(np.mean([r[key] for r in experiment[arm]]))


def test_enas_is_no_better_than_random_search_with_shared_weights(experiment):
    enas, rs = _mean(experiment, "enas", "best_val_acc"), _mean(experiment, "random", "best_val_acc")
    assert abs(enas - rs) <= 0.02, (enas, rs)


def test_the_buffer_raises_the_hidden_state_graph_correlation(experiment):
    base = _mean(experiment, "enas", "hidden_graph_spearman")
    buffered = _mean(experiment, "enas_buffer", "hidden_graph_spearman")
    assert buffered - base >= 0.1, (base, buffered)


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: without the buffer the controller's final hidden state already correlates with the graph "
    "edit distance (Spearman 0.28, 3-seed mean; EXPERIMENTS.md), above the proposed 0.15",
)
def test_baseline_correlation_is_at_most_0_15(experiment):
    assert _mean(experiment, "enas", "hidden_graph_spearman") <= 0.15


def test_resume_continues_the_same_trajectory(tmp_path):
    """Killed after step 4 (saved at 3), resumed from aux_state.pt: the same weights, controller, baseline, buffer,
    history and final numbers."""

    class KilledAt4(ENASTrainer):
        def step(self):
            if self.global_step == 4:
                raise KeyboardInterrupt
            return super().step()

    cfg = dict(arm="enas_buffer", max_steps=6, save_every=3, eval_every=3, corr_pairs=5, final_samples=3)
    full = ENASTrainer(ENASConfig(**cfg, output_dir=str(tmp_path / "full")))
    expected = full.train(verbose=False)
    with pytest.raises(KeyboardInterrupt):
        KilledAt4(ENASConfig(**cfg, output_dir=str(tmp_path / "cut"))).train(verbose=False)
    resumed = ENASTrainer(ENASConfig(**cfg, output_dir=str(tmp_path / "cut")))
    final = resumed.train(verbose=False, resume=True)
    assert {k: v for k, v in final.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}
    assert resumed.history == full.history
    assert resumed.baseline == full.baseline and list(resumed.buffer) == list(full.buffer)
    for a, b in ((full.shared, resumed.shared), (full.controller, resumed.controller)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "bad, word",
    [(dict(arm="darts"), "arm"), (dict(baseline_decay=1.0), "baseline_decay"), (dict(corr_pairs=1), "corr_pairs")],
)
def test_bad_config_is_refused(bad, word):
    with pytest.raises(ValueError, match=word):
        ENASConfig(**bad)


def test_recipe_runs_from_the_cli_and_bad_values_are_one_line(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "run"
    argv = ["train", "enas/digits_enas_buffer", "--max_steps", "6", "--eval_every", "3", "--corr_pairs", "10"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "enas" and [h["step"] for h in results["history"]] == [3, 6]
    assert "hidden_graph_spearman" in results["final"] and "decode_loss" in results["history"][-1]
    assert_refused(["train", "enas/digits_enas", "--arm", "darts"], "arm", capsys, tmp_path / "x")
    assert main(["list"]) == 0
    assert "enas/digits_random" in capsys.readouterr().out

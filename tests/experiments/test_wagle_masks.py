"""The WAGLE mask experiment (experiments/wagle_masks.py; EXPERIMENTS.md): it runs the package's WAGLE
functions on a tiny model that learned the fictitious authors, masks have the asked ratio, every run starts from the
same model, GradDiff forgets, and the table reads the curves where retain accuracy has dropped by the given amount."""

import sys

import pytest
import torch
from support import load_experiment


@pytest.fixture(scope="module")
def exp():
    yield load_experiment("wagle_masks")
    sys.modules.pop("wagle_masks", None)


@pytest.fixture(scope="module")
def small(exp):
    # a cut-down run: 1 seed, a short pre-training, 16 unlearning steps at the quick learning rate
    return exp.run(
        seeds=(0,),
        ratios=(0.5,),
        masks=("wagle", "random"),
        steps=16,
        lr=1e-3,
        eval_every=4,
        pretrain_steps=120,
        log=lambda *a: None,
    )


def test_at_drop_interpolates_the_first_crossing(exp):
    curve = {
        "step": [0, 2, 4, 6],
        "retain_acc": [1.0, 0.99, 0.93, 0.80],
        "forget_acc": [1.0, 0.9, 0.6, 0.5],
        "mia_auc": [1.0, 1.0, 0.8, 0.7],
    }
    got = exp.at_drop(curve, 0.05)  # level 0.95: between steps 2 and 4, two thirds of the way
    assert got["step"] == pytest.approx(2 + 4 / 3) and got["forget_acc"] == pytest.approx(0.7)
    assert got["mia_auc"] == pytest.approx(1.0 - 0.2 * 2 / 3)
    assert exp.at_drop(curve, 0.3) is None


def test_runs_share_their_start_and_masks_have_the_ratio(small):
    runs = small["runs"]
    assert [(r["mask"], r["ratio"]) for r in runs] == [("dense", 1.0), ("wagle", 0.5), ("random", 0.5)]
    assert runs[0]["density"] == 1.0 and all(r["density"] == pytest.approx(0.5, abs=1e-5) for r in runs[1:])
    starts = [{k: v[0] for k, v in r["curve"].items()} for r in runs]
    assert starts[0] == starts[1] == starts[2]
    assert starts[0]["forget_acc"] > 0.85 and starts[0]["mia_auc"] > 0.9  # the model learned the forget authors
    dense = runs[0]["curve"]
    assert dense["step"] == [0, 4, 8, 12, 16]
    assert dense["forget_acc"][-1] < dense["forget_acc"][0] - 0.1  # GradDiff forgets
    assert runs[1]["curve"]["forget_acc"] != dense["forget_acc"]  # the mask changes the run


def test_table_is_what_the_curves_say(exp, small):
    for r in small["runs"]:
        for drop, value in r["levels"].items():
            assert value == exp.at_drop(r["curve"], float(drop))
    row = small["table"]["0.50 wagle"]["levels"][str(exp.DROPS[0])]
    run = small["runs"][1]["levels"][str(exp.DROPS[0])]
    assert (row["forget_acc"], row["missing"]) == ((run["forget_acc"], 0) if run else (None, 1))
    assert "| 0.50 | random |" in exp.format_table(small)


@pytest.mark.slow
def test_quick_mode_runs(exp, capsys):
    result = exp.main(["--quick"])
    assert "| 1.00 | dense |" in capsys.readouterr().out
    assert len(result["runs"]) == 4 and result["config"]["steps"] == exp.QUICK["steps"]
    torch.testing.assert_close(
        torch.tensor(result["runs"][0]["curve"]["forget_acc"][0]),
        torch.tensor(result["runs"][3]["curve"]["forget_acc"][0]),
    )

"""GBNN (Emami & Martinez-Munoz 2019): gradient-boosted one-unit-group networks against a jointly trained MLP, and the
overfitting failure mode.

Questions:
1. On breast_cancer (70/30 stratified), does a network grown by 20 boosting stages of 4 logistic units (Adam-fit stage
   nets, Newton step, eta 0.5) match a jointly trained 80-unit MLP, and is the assembled single network the same
   function as the staged ensemble?
2. On diabetes (standardised target), what happens with 100 one-unit L-BFGS stages at eta 0.5 and no weight decay,
   and does eta 0.1 with weight decay 1e-3 in the stage nets prevent it?

    .venv/bin/python experiments/gbnn.py [--seeds 0 1 2 3 4]    # ~1 minute; results/gbnn.json, .png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.gbnn import GBNNConfig, GBNNTrainer, max_uptick, staged_scores

RESULTS = Path(__file__).resolve().parent / "results"

BREAST_CANCER = dict(
    dataset="breast_cancer", max_steps=20, units_per_stage=4, eta=0.5, stage_optimizer="adam", stage_lr=0.05
)
DIABETES = {
    "overfit (eta 0.5, no decay)": dict(
        dataset="diabetes", max_steps=100, units_per_stage=1, eta=0.5, stage_optimizer="lbfgs", joint_baseline=False
    ),
    "remedy (eta 0.1, decay 1e-3)": dict(
        dataset="diabetes",
        max_steps=100,
        units_per_stage=1,
        eta=0.1,
        stage_optimizer="lbfgs",
        stage_weight_decay=1e-3,
        joint_baseline=False,
    ),
}


def run(seed: int, **kwargs) -> GBNNTrainer:
    with tempfile.TemporaryDirectory() as out:
        t = GBNNTrainer(GBNNConfig(seed=seed, output_dir=out, max_seconds=3600, **kwargs))
        t.train(verbose=False)
    return t


def breast_cancer(seed: int) -> dict:
    t = run(seed, **BREAST_CANCER)
    ev = t.evaluate()
    net = t.to_single_network()
    with torch.no_grad():
        assembled = net(t.x_test)[:, 0] / 2  # the network gives the logit 2F
    losses = staged_scores(t)
    return {
        "gbnn_acc": ev["test_accuracy"],
        "joint_acc": ev["joint_test_accuracy"],
        "assembly_max_abs_diff": float((assembled - t.predict(t.x_test)).abs().max()),
        "train_loss": losses,
        "max_uptick": max_uptick(losses),
        "test_acc_curve": [h["test_accuracy"] for h in t.history],
        "rhos": t.rhos,
    }


def diabetes(seed: int, kwargs: dict) -> dict:
    t = run(seed, **kwargs)
    h = t.history
    return {
        "units": [x["units"] for x in h],
        "test_mse": [x["test_mse"] for x in h],
        "train_mse": [2 * x["train_loss"] for x in h],
        "rhos": t.rhos,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    seeds = parser.parse_args().seeds
    torch.set_num_threads(1)
    bc = {str(s): breast_cancer(s) for s in seeds}
    db = {arm: {str(s): diabetes(s, kw) for s in seeds} for arm, kw in DIABETES.items()}
    write_json_atomic(RESULTS / "gbnn.json", {"breast_cancer": bc, "diabetes": db})

    print("| seed | GBNN acc | joint MLP acc | assembled vs staged, max abs | largest train-loss uptick |")
    print("|---|---|---|---|---|")
    for s, r in bc.items():
        print(
            f"| {s} | {r['gbnn_acc']:.3f} | {r['joint_acc']:.3f} | {r['assembly_max_abs_diff']:.1e} "
            f"| {100 * r['max_uptick']:.2f} % |"
        )
    g = sum(r["gbnn_acc"] for r in bc.values()) / len(bc)
    j = sum(r["joint_acc"] for r in bc.values()) / len(bc)
    print(f"| mean | {g:.4f} | {j:.4f} | difference {100 * (g - j):+.2f} pp | |")
    marks = (10, 20, 50, 100)
    print("\ndiabetes test MSE (standardised target) after " + ", ".join(map(str, marks)) + " units, per seed:")
    for arm, runs in db.items():
        for s, r in runs.items():
            at = {u: m for u, m in zip(r["units"], r["test_mse"])}
            tr = {u: m for u, m in zip(r["units"], r["train_mse"])}
            print(
                f"  {arm:<30} seed {s}: test "
                + " ".join(f"{at[u]:.3g}" for u in marks)
                + "  train "
                + " ".join(f"{tr[u]:.3g}" for u in marks)
            )

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (s, r) in enumerate(bc.items()):
        ax1.plot(range(1, len(r["test_acc_curve"]) + 1), r["test_acc_curve"], color=f"C{i}", label=f"seed {s}")
        ax1.axhline(r["joint_acc"], color=f"C{i}", ls=":", lw=1)
    ax1.set(xlabel="stage (4 units each)", ylabel="test accuracy", title="breast_cancer: GBNN (dotted: joint MLP)")
    ax1.legend(fontsize=7)
    for i, (arm, runs) in enumerate(db.items()):
        for j, r in enumerate(runs.values()):
            ax2.semilogy(r["units"], r["test_mse"], color=f"C{i}", label=arm if j == 0 else None)
            ax2.semilogy(r["units"], r["train_mse"], color=f"C{i}", ls=":", lw=1)
    ax2.set(xlabel="hidden units (stages)", ylabel="MSE (dotted: train)", title="diabetes: the failure mode")
    ax2.legend(fontsize=7)
    save_figure(fig, RESULTS / "gbnn.png", dpi=90)


if __name__ == "__main__":
    main()

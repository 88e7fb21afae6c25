"""ModHiFi on digits and on a tiny LM: pruning and class unlearning without gradients (arXiv 2511.19566; the scores
and selection rules are a reconstruction, UNVERIFIED).

Digits (3 seeds): an MLP 64-256-256-10 trained on 1200 images (20 Adam epochs), 597 test images; 500 synthetic
calibration inputs from per-class Gaussian fits. Pruning removes 50 % of each hidden layer, no fine-tuning; the
arms are ModHiFi-P (singleton fidelity + least-squares re-fit), magnitude and random (no re-fit); the rows
after them separate the score from the re-fit. Unlearning forgets class 3 with budgets 10/25/50 % per layer, with
the default re-fit (split) and the retain-only re-fit. Criteria (tested on seed 0 in
tests/trainers/classic/test_modhifi.py): pruning drop <= 3 pp, >= magnitude + 3 pp, >= random + 5 pp; unlearning
forget accuracy <= 10 %, retain drop <= 3 pp.

Tiny Qwen3 (random weights, ``tiny:qwen3``): half of every MLP's channels, 32 calibration sequences of 64 tokens of
arithmetic chat text; the relative squared error of the logits against the original model on held-out text.

    .venv/bin/python experiments/modhifi.py   # a few minutes on 1 thread; results/modhifi.json, .png
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.modhifi import run_arms

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
PRUNE = {
    "ModHiFi-P (fidelity + re-fit)": dict(score="fidelity", compensate=True),
    "magnitude": dict(score="magnitude", compensate=False),
    "random": dict(score="random", compensate=False),
    "fidelity, no re-fit": dict(score="fidelity", compensate=False),
    "magnitude + re-fit": dict(score="magnitude", compensate=True),
    "random + re-fit": dict(score="random", compensate=True),
}
UNLEARN = {
    f"budget {int(b * 100)} %, re-fit {refit}": dict(mode="unlearn", unlearn_budget=b, unlearn_refit=refit)
    for refit in ("split", "retain")
    for b in (0.1, 0.25, 0.5)
}
LLM = {
    "ModHiFi-P (fidelity + re-fit)": [],
    "magnitude": dict(score="magnitude", compensate=False),
    "random": dict(score="random", compensate=False),
    "magnitude + re-fit": dict(score="magnitude", compensate=True),
}


def main() -> None:
    torch.set_num_threads(1)
    results: dict = {"prune": {}, "unlearn": {}, "llm": {}}
    with tempfile.TemporaryDirectory() as out:
        for seed in SEEDS:
            runs = run_arms({**{k: dict(mode="prune", **v) for k, v in PRUNE.items()}, **UNLEARN}, seed, out)
            for name in PRUNE:
                results["prune"].setdefault(name, []).append(runs[name])
            for name in UNLEARN:
                results["unlearn"].setdefault(name, []).append(runs[name])
        llm = {k: (v or {}) for k, v in LLM.items()}
        runs = run_arms(llm, 0, out, model_name_or_path="tiny:qwen3", calib_samples=32)
        results["llm"] = runs
    write_json_atomic(RESULTS / "modhifi.json", results)

    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    print("| pruning arm (50 % per layer) | test acc, seeds 0-2 (%) | mean drop (pp) |")
    print("|---|---|---|")
    for name, rows in results["prune"].items():
        accs = ", ".join(pct(r["test_acc"]) for r in rows)
        drop = np.mean([r["test_acc_before"] - r["test_acc"] for r in rows]) * 100
        print(f"| {name} | {accs} | {drop:.1f} |")
    print("before:", ", ".join(pct(r["test_acc_before"]) for r in results["prune"]["magnitude"]))
    print()
    print("| unlearning class 3 | forget acc, seeds 0-2 (%) | retain drop, seeds 0-2 (pp) |")
    print("|---|---|---|")
    for name, rows in results["unlearn"].items():
        forget = ", ".join(pct(r["forget_acc"]) for r in rows)
        drop = ", ".join(f"{100 * (r['retain_acc_before'] - r['retain_acc']):.1f}" for r in rows)
        print(f"| {name} | {forget} | {drop} |")
    print()
    print("| tiny Qwen3, 50 % of MLP channels | logit rel. error | held-out NLL (before) | params (before) |")
    print("|---|---|---|---|")
    for name, r in results["llm"].items():
        print(
            f"| {name} | {r['logit_rel_err']:.4f} | {r['heldout_nll']:.4f} ({r['heldout_nll_before']:.4f}) | "
            f"{r['params']} ({r['params_before']}) |"
        )

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(results["prune"])
    means = [np.mean([r["test_acc"] for r in results["prune"][n]]) * 100 for n in names]
    ax1.bar(range(len(names)), means)
    ax1.axhline(np.mean([r["test_acc_before"] for r in results["prune"]["magnitude"]]) * 100, color="k", ls="--")
    ax1.set_xticks(
        range(len(names)),
        [n.replace(" (", "\n(").replace(", ", ",\n").replace(" + ", "\n+ ") for n in names],
        fontsize=6,
    )
    ax1.set(ylabel="test accuracy, 3-seed mean (%)", title="digits MLP, 50 % of each hidden layer pruned")
    for refit, marker in (("split", "o"), ("retain", "x")):
        for seed_i in range(len(SEEDS)):
            xs, ys = [], []
            for b in (0.1, 0.25, 0.5):
                r = results["unlearn"][f"budget {int(b * 100)} %, re-fit {refit}"][seed_i]
                xs.append(100 * r["forget_acc"])
                ys.append(100 * (r["retain_acc_before"] - r["retain_acc"]))
            ax2.plot(xs, ys, marker=marker, label=f"re-fit {refit}, seed {SEEDS[seed_i]}")
    ax2.axvline(10, color="k", ls=":")
    ax2.axhline(3, color="k", ls=":")
    ax2.set(xlabel="forget-class (3) test accuracy (%)", ylabel="retain accuracy drop (pp)", title="unlearning")
    ax2.legend(fontsize=6)
    save_figure(fig, RESULTS / "modhifi.png", dpi=90)


if __name__ == "__main__":
    main()

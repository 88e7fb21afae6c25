"""Blindspot regression unlearning on diabetes, against Gaussian-amnesiac and fine-tune (arXiv 2210.08196).

Setting (the smallest experiment): scikit-learn's diabetes, x standardised, y in original units, 25 % held
out; forget = training samples with y at or below the training 25th percentile; MLP 10-64-64-1, L1 loss, Adam 1e-3,
batch 32; original 400 epochs on all training data, gold 400 epochs on the retain set, proxy 30 epochs on the
retain set, every arm fine-tunes 40 epochs; beta_AT = 50; 3 seeds. Criteria (tested per seed in
tests/trainers/classic/test_blindspot.py): MAE_f(unl) - MAE_f(orig) >= 0.5 (MAE_f(gold) - MAE_f(orig)) and
MAE_r(unl) <= 1.10 MAE_r(orig); reported: Blindspot against Gaussian-amnesiac on the 3-seed mean.

    .venv/bin/python experiments/blindspot.py   # about a minute of CPU on 1 thread; results/blindspot.json, .png
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.blindspot import compare_arms

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
KEYS = ("mae_f", "mae_r", "mae_f_orig", "mae_r_orig", "mae_f_gold", "mae_r_gold", "gap_closed", "retain_ratio",
        "wasserstein_to_gold_f")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        runs = compare_arms(seeds=SEEDS, output_dir=out)
    results = {arm: {"per_seed": [{k: r[k] for k in KEYS} for r in rows]} for arm, rows in runs.items()}
    for r in results.values():
        r["mean"] = {k: float(np.mean([s[k] for s in r["per_seed"]])) for k in KEYS}
    write_json_atomic(RESULTS / "blindspot.json", results)

    first = results["blindspot"]["per_seed"]
    print("original MAE_f / MAE_r per seed:", [(round(s["mae_f_orig"], 1), round(s["mae_r_orig"], 1)) for s in first])
    print("gold     MAE_f / MAE_r per seed:", [(round(s["mae_f_gold"], 1), round(s["mae_r_gold"], 1)) for s in first])
    print(
        "| arm | MAE_f, seeds 0-2 | MAE_r, seeds 0-2 | gap closed, seeds 0-2 (mean) | MAE_r / orig (max) "
        "| W1 to gold on forget-test (mean) |"
    )
    print("|---|---|---|---|---|---|")
    for arm, r in results.items():
        ps, m = r["per_seed"], r["mean"]
        f = lambda k, d=1, ps=ps: ", ".join(f"{s[k]:.{d}f}" for s in ps)  # noqa: E731
        print(
            f"| {arm} | {f('mae_f')} | {f('mae_r')} | {f('gap_closed', 2)} ({m['gap_closed']:.2f}) | "
            f"{max(s['retain_ratio'] for s in ps):.3f} | {m['wasserstein_to_gold_f']:.1f} |"
        )

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in results.items():
        ax.scatter([s["mae_f"] for s in r["per_seed"]], [s["mae_r"] for s in r["per_seed"]], label=arm)
    ax.scatter([s["mae_f_orig"] for s in first], [s["mae_r_orig"] for s in first], marker="s", c="k", label="original")
    ax.scatter([s["mae_f_gold"] for s in first], [s["mae_r_gold"] for s in first], marker="*", s=120, c="gold",
               edgecolors="k", label="gold (retrained)")  # fmt: skip
    ax.set(xlabel="MAE on forget-test (higher: more forgotten)", ylabel="MAE on retain-test", title="diabetes, 3 seeds")
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "blindspot.png", dpi=90)


if __name__ == "__main__":
    main()

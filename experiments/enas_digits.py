"""ENAS, ENAS with a memory buffer (UNVERIFIED loss) and random search with shared weights on digits (arXiv 1904.00438).

Setting (``trainers/classic/enas.py``): a 4-node cell (input and op per node, shared width-64 linears), 400
alternating steps (one shared-weight minibatch, one controller update of 4 children), LSTM controller with hidden 32;
the best of 50 sampled architectures by shared-weight validation accuracy; the Spearman correlation between the
controller's final hidden-state distance and the graph edit distance over 200 pairs. Seeds 0-4 (the criteria use
0-2). A reference row: the untrained controller (step 0).

Pass criteria (tested in tests/trainers/classic/test_enas.py, 3-seed means): |ENAS - RS-WS| best-found validation
accuracy <= 2 pp; correlation with the buffer >= without + 0.1; without the buffer <= 0.15.

    .venv/bin/python experiments/enas_digits.py   # ~2-3 minutes on 1 thread; results/enas_digits.json, .png
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.enas import ENASConfig, ENASTrainer, search

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2, 3, 4)
ARMS = ("enas", "enas_buffer", "random")
KEYS = ("best_val_acc", "best_test_acc", "mean_val_acc", "hidden_graph_spearman")


def main() -> None:
    torch.set_num_threads(1)
    runs = {}
    for arm in ARMS:
        runs[arm] = []
        for seed in SEEDS:
            start = time.process_time()
            r = search(arm, seed, output_dir="unused")
            r["cpu_seconds"] = time.process_time() - start
            runs[arm].append(r)
    runs["untrained controller"] = [ENASTrainer(ENASConfig(seed=s, output_dir="unused")).evaluate() for s in SEEDS]
    write_json_atomic(RESULTS / "enas_digits.json", runs)

    def mean(arm, key, n):
        vals = [r[key] for r in runs[arm][:n] if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    print(
        "| arm | best val acc, seeds 0-4 | mean 0-2 | mean 0-4 | its test acc, mean 0-4 | mean val acc of the 50 |"
        " Spearman(h dist, GED), seeds 0-4 | mean 0-2 | mean 0-4 | CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, rows in runs.items():
        best = ", ".join(f"{r['best_val_acc']:.4f}" for r in rows)
        rho = ", ".join(f"{r['hidden_graph_spearman']:.3f}" for r in rows if "hidden_graph_spearman" in r) or "n/a"
        cpu = np.mean([r.get("cpu_seconds", 0.0) for r in rows])
        print(
            f"| {arm} | {best} | {mean(arm, 'best_val_acc', 3):.4f} | {mean(arm, 'best_val_acc', 5):.4f} | "
            f"{mean(arm, 'best_test_acc', 5):.4f} | {mean(arm, 'mean_val_acc', 5):.4f} | {rho} | "
            f"{mean(arm, 'hidden_graph_spearman', 3):.3f} | {mean(arm, 'hidden_graph_spearman', 5):.3f} | {cpu:.1f} |"
        )

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, arm in enumerate(ARMS):
        vals = [100 * r["best_val_acc"] for r in runs[arm]]
        ax1.scatter([i] * len(vals), vals, alpha=0.6)
        ax1.bar(i, np.mean(vals), alpha=0.3)
    ax1.set_xticks(range(len(ARMS)), ARMS)
    ax1.set(ylim=(80, 95), ylabel="best-of-50 shared-weight val acc (%)", title="ENAS vs random search (WS)")
    names = ["untrained controller", "enas", "enas_buffer"]
    for i, arm in enumerate(names):
        vals = [r["hidden_graph_spearman"] for r in runs[arm]]
        ax2.scatter([i] * len(vals), vals, alpha=0.6)
        ax2.bar(i, np.mean(vals), alpha=0.3)
    ax2.axhline(0.15, color="grey", lw=0.5, ls="--")
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    ax2.set(ylabel="Spearman(hidden distance, GED)", title="structure in the controller's state")
    save_figure(fig, RESULTS / "enas_digits.png", dpi=80)


if __name__ == "__main__":
    main()

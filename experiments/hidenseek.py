"""HideNseek on digits: sign supermask on a SynFlow-pruned random MLP against edge-popup and dense FedAvg.

Setting (trainers/classic/hidenseek.py; Vallapuram et al., arXiv 2206.04385, reconstructed): scikit-learn's digits,
80/20 split, 10 clients with a Dirichlet(0.5) label split, MLP 64-200-200-10 without biases, density 0.2, 30
rounds of 5 clients x 2 local epochs (minibatch 32), 3 seeds. Rows:

* hidenseek (1-bit upload): SynFlow mask, sign(tau) uploaded, server tau = mean of the signs (the method; Adam 0.15);
* hidenseek (score upload): the same with the float scores uploaded (32 bits per unpruned weight; Adam 0.05);
* binary_supermask: edge-popup top-20 % |scores| over all weights, FedAvg on the float scores (Adam 0.05);
* fedavg: dense FedAvg (SGD 0.1, momentum 0.9), the reference.

Pass criteria (tested in tests/trainers/classic/test_hidenseek.py where they hold): final accuracy
(a) >= (b) + 3 pp over 3 seeds; rounds to 80 % of the final accuracy (a) <= (b); uplink bits per round (a) <= (b).

    .venv/bin/python experiments/hidenseek.py   # ~1 minute of CPU on 1 thread; results/hidenseek.json, .png
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.hidenseek import compare_arms

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
ROWS = {
    "hidenseek": "hidenseek (SynFlow mask, sign supermask, 1-bit upload)",
    "hidenseek:scores": "hidenseek, float-score upload (ablation)",
    "binary_supermask": "binary supermask (edge-popup, FedAvg on scores)",
    "fedavg": "dense FedAvg (reference)",
}
VARIANTS = {"hidenseek:scores": {"upload": "scores", "local_lr": 0.05}}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        results = compare_arms(tuple(ROWS), seeds=SEEDS, output_dir=out, variants=VARIANTS, max_seconds=3600)
    write_json_atomic(RESULTS / "hidenseek.json", results)

    print("| arm | final test acc, seeds 0-2 | mean | rounds to 80 % of final | uplink bits / round | density |")
    print("|---|---|---|---|---|---|")
    for label, name in ROWS.items():
        r = results[label]
        accs = ", ".join(f"{x['final']:.4f}" for x in r)
        rounds = ", ".join(str(x["rounds_to_80"]) for x in r)
        mean = np.mean([x["final"] for x in r])
        print(f"| {name} | {accs} | {mean:.4f} | {rounds} | {r[0]['uplink_bits']:,} | {r[0]['density']:.3f} |")

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, name in ROWS.items():
        curves = np.array([x["accuracy"] for x in results[label]])
        rounds = np.arange(1, curves.shape[1] + 1)
        ax.plot(rounds, curves.mean(0), label=name)
        ax.fill_between(rounds, curves.min(0), curves.max(0), alpha=0.2)
    ax.set(xlabel="round", ylabel="test accuracy (mean, min-max over 3 seeds)", title="HideNseek on digits, 10 clients")
    ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "hidenseek.png", dpi=90)


if __name__ == "__main__":
    main()

"""The Muon arm of the Li2 grokking experiment: epochs to 90% test accuracy on Z_23 from half of the pairs.

    python experiments/li2_muon.py [--seeds 0 1 2] [--max_steps 10000] [--out experiments/results/li2_muon]

Arms (all: M = 23, K = 256, sigma = z^2, CE, full batch, train fraction 0.5, above the critical 0.375):
adam (lr 1e-3, wd 1e-4 on W and V); muon (Muon lr 1e-2, wd 1e-2 on the hidden matrix W, V on the Adam arm's Adam);
muon_repo_pairing (Muon as before, V on Adam with Muon's lr 1e-2 and wd 1e-2, as the Li2 repository pairs them);
adam_1e-2 (Adam lr 1e-2, wd 1e-2 on both: the control for the repository pairing). Each run stops at 90% test
accuracy or max_steps; writes <out>.json and <out>.png (test accuracy per arm and seed).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from posttrain.trainers.classic.li2_grokking import Li2GrokkingConfig, Li2GrokkingTrainer

ARMS = {
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4),
    "muon": dict(optimizer="muon", lr=1e-3, weight_decay=1e-4, muon_lr=1e-2, muon_weight_decay=1e-2),
    "muon_repo_pairing": dict(optimizer="muon", lr=1e-2, weight_decay=1e-2, muon_lr=1e-2, muon_weight_decay=1e-2),
    "adam_1e-2": dict(optimizer="adam", lr=1e-2, weight_decay=1e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=10000)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", default="experiments/results/li2_muon")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    for arm in args.arms:
        for seed in args.seeds:
            cfg = Li2GrokkingConfig(moduli=[23], hidden_size=256, train_fraction=0.5, max_steps=args.max_steps,
                                    eval_every=50, stop_at_test_acc=0.9, max_seconds=3600, seed=seed,
                                    output_dir=f"runs/li2_muon/{arm}-seed{seed}", **ARMS[arm])
            trainer = Li2GrokkingTrainer(cfg)
            final = trainer.train(verbose=False)
            runs[f"{arm}/{seed}"] = {"arm": arm, "seed": seed, "final": final, "history": trainer.history}
            print(f"{arm:<18} seed {seed}: epochs to 90% {final['step_test_acc_90']}, test {final['test_acc']:.3f}, "
                  f"concentration {final['fourier_concentration']:.3f}, {final['seconds']:.0f} s", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"arms": {a: ARMS[a] for a in args.arms}, "max_steps": args.max_steps, "runs": runs}, f, indent=1)
    plot(runs, args.out + ".png")


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for run in runs.values():
        steps = [h["step"] for h in run["history"]]
        label = run["arm"] if run["seed"] == min(r["seed"] for r in runs.values() if r["arm"] == run["arm"]) else None
        axes[0].plot(steps, [h["test_acc"] for h in run["history"]], color=colors[run["arm"]], label=label, lw=1)
        axes[1].plot(steps, [h["fourier_concentration"] for h in run["history"]], color=colors[run["arm"]], lw=1)
    axes[0].axhline(0.9, color="grey", ls=":", lw=1)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="Z_23, train fraction 0.5")
    axes[1].set(xlabel="epoch", ylabel="Fourier concentration of W_a rows")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()

"""Li2 grokking on Z_23: the train-fraction sweep (memorise vs generalise) and the Muon arm.

    python experiments/li2_grokking.py fractions [--out experiments/results/li2_fractions]
    python experiments/li2_grokking.py muon [--fraction 0.5] [--seeds 0 1 2] [--max_steps 10000] [--out ...]

Both: M = 23, K = 256, sigma = z^2, cross-entropy, full batch (trainers/classic/li2_grokking.py); the critical
train fraction is 2.7482 ln 23 / 23 = 0.375.
- fractions: Adam (lr 1e-3, wd 1e-4), 3000 epochs, seed 0, train fractions 0.15, 0.3, 0.5, 0.7.
- muon: train fraction 0.5 (``--fraction``); epochs to 90% test accuracy (each run stops there, or at max_steps).
Arms: adam (lr
  1e-3, wd 1e-4 on W and V); muon (Muon lr 1e-2, wd 1e-2 on the hidden matrix W, V on the adam arm's Adam);
  muon_repo_pairing (Muon as before, V on Adam with Muon's lr 1e-2 and wd 1e-2, as the Li2 repository pairs them);
  adam_1e-2 (Adam lr 1e-2, wd 1e-2 on both: the control for the repository pairing).
Writes <out>.json and <out>.png after every run, and skips the runs <out>.json already holds.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from posttrain.atomic import write_text_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.li2_grokking import Li2GrokkingConfig, Li2GrokkingTrainer, critical_fraction

BASE = dict(moduli=[23], hidden_size=256, activation="sqr", loss="ce", max_seconds=3600)
ARMS = {
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4),
    "muon": dict(optimizer="muon", lr=1e-3, weight_decay=1e-4, muon_lr=1e-2, muon_weight_decay=1e-2),
    "muon_repo_pairing": dict(optimizer="muon", lr=1e-2, weight_decay=1e-2, muon_lr=1e-2, muon_weight_decay=1e-2),
    "adam_1e-2": dict(optimizer="adam", lr=1e-2, weight_decay=1e-2),
}
FRACTIONS = (0.15, 0.3, 0.5, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("fractions", "muon"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=10000)
    parser.add_argument("--fraction", type=float, default=0.5, help="muon: the train fraction")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    suffix = f"_f{args.fraction}" if args.part == "muon" and args.fraction != 0.5 else ""
    out = args.out or f"experiments/results/li2_{args.part}{suffix}"
    torch.set_num_threads(1)
    runs = json.load(open(out + ".json"))["runs"] if os.path.exists(out + ".json") else {}
    if args.part == "fractions":
        jobs = {
            f"adam/f{f}": (dict(ARMS["adam"], train_fraction=f, max_steps=3000, eval_every=100, seed=0), "adam", f)
            for f in FRACTIONS
        }
    else:
        jobs = {
            f"{arm}/{seed}": (
                dict(
                    ARMS[arm],
                    train_fraction=args.fraction,
                    max_steps=args.max_steps,
                    eval_every=50,
                    stop_at_test_acc=0.9,
                    seed=seed,
                ),
                arm,
                seed,
            )
            for arm in args.arms
            for seed in args.seeds
        }
    for key, (cfg, arm, tag) in jobs.items():
        if key in runs:
            continue
        trainer = Li2GrokkingTrainer(Li2GrokkingConfig(**BASE, **cfg, output_dir=f"runs/li2_{args.part}{suffix}/{key}"))
        final = trainer.train(verbose=False)
        runs[key] = {"arm": arm, "tag": tag, "config": cfg, "final": final, "history": trainer.history}
        print(
            f"{key:<22} epochs to 90% {final['step_test_acc_90']}, train {final['train_acc']:.3f}, test "
            f"{final['test_acc']:.3f}, concentration {final['fourier_concentration']:.3f}, "
            f"||G_F|| {final['grad_f_norm']:.4g}, FF^T off-diag {final['fft_offdiag_ratio']:.3f}, "
            f"{final['seconds']:.0f} s",
            flush=True,
        )
        payload = rounded({"critical_fraction": critical_fraction(23), "runs": runs})
        write_text_atomic(out + ".json", json.dumps(payload, separators=(",", ":")))
        plot(runs, out + ".png", args.part if args.part == "fractions" else f"train fraction {args.fraction}")


def rounded(x):
    """5 significant digits for every float: the histories are long, and the tables quote 3."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return [rounded(v) for v in x] if isinstance(x, list) else x


def plot(runs: dict, path: str, part: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    groups = sorted({r["tag"] if part == "fractions" else r["arm"] for r in runs.values()}, key=str)
    colors = {g: f"C{i}" for i, g in enumerate(groups)}
    seen = set()
    for run in runs.values():
        group = run["tag"] if part == "fractions" else run["arm"]
        steps = [h["step"] for h in run["history"]]
        label = None if group in seen else (f"train fraction {group}" if part == "fractions" else group)
        seen.add(group)
        axes[0].plot(steps, [h["test_acc"] for h in run["history"]], color=colors[group], label=label, lw=1)
        axes[1].plot(steps, [h["fourier_concentration"] for h in run["history"]], color=colors[group], lw=1)
        axes[2].semilogy(steps, [h["grad_f_norm"] for h in run["history"]], color=colors[group], lw=1)
    axes[0].axhline(0.9, color="grey", ls=":", lw=1)
    title = "Adam, 3000 epochs" if part == "fractions" else part
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title=f"Z_23, {title}")
    axes[1].set(xlabel="epoch", ylabel="Fourier concentration of W_a rows")
    axes[2].set(xlabel="epoch", ylabel="||G_F||")
    axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=80)


if __name__ == "__main__":
    main()

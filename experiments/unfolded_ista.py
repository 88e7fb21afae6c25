"""Deep-unfolded ISTA and IHT, supervised vs unsupervised training (Nagahisa, Hayakawa, Iiguni, arXiv 2509.01331).

Question: with T = 20 layers and learned step sizes (m = 50, n = 100, p = 0.1, sigma = 0.01, lambda = 0.05, Adam lr 0.05
on log gamma_t, 500 steps of 100 fresh samples, 1000 test samples), does supervised training (E||x_T - x||^2) give the
lower NMSE while unsupervised training (E J(x_T)) gets close to the LASSO optimum (convex case), and do both DU-IHT
variants beat plain IHT on J_0 (nonconvex case)? Plus the mismatch test: train with p = 0.1, test with p = 0.2.

    .venv/bin/python experiments/unfolded_ista.py     # ~2 min on 1 thread; results/unfolded_ista.json, .png
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.unfolded_ista import UnfoldedISTAConfig, UnfoldedISTATrainer

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)


def run(algo: str, seed: int, test_p: float = -1.0) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t = UnfoldedISTATrainer(UnfoldedISTAConfig(algo=algo, seed=seed, test_p=test_p, output_dir=out))
        final = t.train(verbose=False)
    final["history"] = [{k: v for k, v in h.items() if not k.startswith("gamma")} for h in t.history]
    return final


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for algo, test_p in (("ista", -1.0), ("iht", -1.0), ("ista", 0.2), ("iht", 0.2)):
        name = algo if test_p == -1.0 else f"{algo}_mismatch"
        results[name] = {seed: run(algo, seed, test_p) for seed in SEEDS}
    write_json_atomic(RESULTS / "unfolded_ista.json", results)
    for name, by_seed in results.items():
        algo = name.split("_")[0]
        print(f"{name}: seed | NMSE dB {algo}-T / ref / sup / unsup | J {algo}-T / ref / sup / unsup")
        for seed, r in by_seed.items():
            keys = [f"{algo}_T", f"{algo}_ref", "sup", "unsup"]
            print(
                f"  {seed} | "
                + " / ".join(f"{r['nmse_db/' + k]:.2f}" for k in keys)
                + " | "
                + " / ".join(f"{r['J/' + k]:.4f}" for k in keys)
            )
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    r0 = results["ista"][0]
    steps = [h["step"] for h in r0["history"]]
    for kind in ("sup", "unsup"):
        axes[0].plot(steps, [h[f"nmse_db/{kind}"] for h in r0["history"]], marker=".", label=f"DU-ISTA {kind}")
        axes[1].plot(steps, [h[f"J/{kind}"] for h in r0["history"]], marker=".", label=f"DU-ISTA {kind}")
    for ax, key in ((axes[0], "nmse_db"), (axes[1], "J")):
        ax.axhline(r0[f"{key}/ista_T"], color="gray", ls="--", label="ISTA-20")
        ax.axhline(r0[f"{key}/ista_ref"], color="k", ls=":", label="LASSO optimum")
        ax.set_xlabel("Adam step")
        ax.legend(fontsize=7)
    axes[0].set(ylabel="test NMSE (dB)", title="DU-ISTA, seed 0")
    axes[1].set(ylabel="test J_1", title="DU-ISTA, seed 0")
    for kind in ("sup", "unsup"):
        axes[2].plot(range(1, 21), r0[f"gamma/{kind}"], marker=".", label=f"gamma_t, {kind}")
    axes[2].set(xlabel="layer t", ylabel="learned step size", title="learned gamma_t (ISTA, seed 0)")
    axes[2].legend(fontsize=7)
    save_figure(fig, RESULTS / "unfolded_ista.png", dpi=90)


if __name__ == "__main__":
    main()

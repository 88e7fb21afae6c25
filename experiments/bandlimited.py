"""Shallow networks with bandlimited random weights (Li, Sonoda, Cao, Wang, Liang 2020): the Omega x k grid and the
width scans.

Question: with random tanh units whose weights and biases are drawn from U[-Omega, Omega] and a ridge readout
(lambda 1e-8), which targets sin(k pi x) on [-1, 1] can the network fit, and does width make up for a band that is
too small? The paper's claim: the approximation error has a floor that does not shrink with the width N when the
target's frequency lies outside the band; with a wide enough band it falls with N.

    .venv/bin/python experiments/bandlimited.py [--seeds 0 1 2]   # ~10 s per seed; results/bandlimited.json, .png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.bandlimited import BandlimitedConfig, BandlimitedTrainer

RESULTS = Path(__file__).resolve().parent / "results"
OMEGAS = (2.0, 20.0, 200.0)
FREQUENCIES = (1, 4, 16, 64)
WIDTHS = (100, 400, 1600)


def run(omega: float, seed: int) -> list[dict]:
    """The width scan at one Omega: the logged numbers of each width (test/train MSE per k, cond of the Gram)."""
    with tempfile.TemporaryDirectory() as out:
        t = BandlimitedTrainer(
            BandlimitedConfig(
                omega=omega,
                widths=list(WIDTHS),
                frequencies=list(FREQUENCIES),
                seed=seed,
                max_seconds=3600,
                output_dir=out,
            )
        )
        t.train(verbose=False)
    return t.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds = parser.parse_args().seeds
    results = {str(seed): {f"{omega:g}": run(omega, seed) for omega in OMEGAS} for seed in seeds}
    write_json_atomic(RESULTS / "bandlimited.json", {"widths": WIDTHS, "frequencies": FREQUENCIES, "runs": results})

    first = results[str(seeds[0])]
    print(f"seed {seeds[0]}: test MSE at N = {WIDTHS[-1]}")
    print("| Omega \\ k | " + " | ".join(str(k) for k in FREQUENCIES) + " |")
    for omega in OMEGAS:
        row = first[f"{omega:g}"][-1]
        print(f"| {omega:g} | " + " | ".join(f"{row[f'test_mse_k{k}']:.2g}" for k in FREQUENCIES) + " |")
    print("width scans at k = 16, test MSE for N = " + "/".join(map(str, WIDTHS)) + " (one column per seed):")
    for omega in OMEGAS:
        cells = ["/".join(f"{h['test_mse_k16']:.2g}" for h in results[str(s)][f"{omega:g}"]) for s in seeds]
        print(f"  Omega {omega:g}: " + "   ".join(cells))
    print("cond(H^T H + n lambda I) at N = " + "/".join(map(str, WIDTHS)) + f", seed {seeds[0]}:")
    for omega in OMEGAS:
        print(f"  Omega {omega:g}: " + "/".join(f"{h['cond_gram']:.2g}" for h in first[f"{omega:g}"]))

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for omega in OMEGAS:
        ax1.loglog(
            FREQUENCIES,
            [max(first[f"{omega:g}"][-1][f"test_mse_k{k}"], 1e-16) for k in FREQUENCIES],
            marker="o",
            label=f"Omega = {omega:g}",
        )
        for s in seeds:
            ax2.loglog(
                WIDTHS,
                [max(h["test_mse_k16"], 1e-16) for h in results[str(s)][f"{omega:g}"]],
                marker="o",
                color=f"C{OMEGAS.index(omega)}",
                label=f"Omega = {omega:g}" if s == seeds[0] else None,
            )
    ax1.set(xlabel="target frequency k (sin(k pi x))", ylabel="test MSE", title=f"N = {WIDTHS[-1]} tanh units")
    ax2.set(xlabel="width N", ylabel="test MSE", title="width scan, k = 16 (every seed)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    save_figure(fig, RESULTS / "bandlimited.png", dpi=90)


if __name__ == "__main__":
    main()

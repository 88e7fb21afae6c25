"""TangleNAS on digits: weight-entangled search against a DARTS supernet with separate weights (arXiv 2312.10440).

Setting (``trainers/classic/tanglenas.py``): an MLP 64-d1-d2-10, d1, d2 in {16, 64, 128}; 300 search iterations
(one AdamW weight step on train, one Adam alpha step on val, lr 3e-4), parameter penalty kappa 0.2; every one of
the 9 architectures retrained from scratch for 300 AdamW steps; seeds 0-2. Rows: TangleNAS with the DARTS,
DrNAS and GDAS samplers, TangleNAS without the penalty and with 5x the penalty, and the DARTS supernet (separate
weights). The kappa calibration (the penalised optimum of the retrained architectures' validation loss) is printed
first.

Pass criteria (tested in tests/trainers/classic/test_tanglenas.py): parameter memory <= 0.6 x DARTS; the argmax
retrains to within 1 pp of the best of the 9; the argmax is in the top 3 on >= 2 of 3 seeds.

    .venv/bin/python experiments/tanglenas_digits.py   # ~1-2 minutes on 1 thread; results/tanglenas_digits.json, .png
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.classic.nas_space import digits_splits, train_mlp
from posttrain.trainers.classic.tanglenas import (
    TangleNASConfig,
    TangleNASTrainer,
    child_params,
    memory_ratio,
    ranks,
)

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS, WIDTHS, RETRAIN = (0, 1, 2), [16, 64, 128], 300
ROWS = {
    "TangleNAS, DARTS sampler": dict(arm="tanglenas", sampler="darts"),
    "TangleNAS, DrNAS sampler": dict(arm="tanglenas", sampler="drnas"),
    "TangleNAS, GDAS sampler": dict(arm="tanglenas", sampler="gdas"),
    "TangleNAS, no penalty (kappa 0)": dict(arm="tanglenas", sampler="darts", kappa=0.0),
    "TangleNAS, kappa 1 (5x the calibrated)": dict(arm="tanglenas", sampler="darts", kappa=1.0),
    "DARTS supernet (separate weights)": dict(arm="darts", sampler="darts"),
}


def main() -> None:
    torch.set_num_threads(1)
    archs = list(itertools.product(WIDTHS, repeat=2))
    space, val_ce = {}, {}
    for seed in SEEDS:
        data = digits_splits(seed)
        for arch in archs:
            net = train_mlp(arch, data, RETRAIN, seed)
            net.eval()
            with torch.no_grad():
                space.setdefault(arch, []).append(
                    float((net(data["test"][0]).argmax(-1) == data["test"][1]).float().mean())
                )
                val_ce.setdefault(arch, []).append(float(F.cross_entropy(net(data["val"][0]), data["val"][1])))
    p_max = child_params((128, 128))
    calibration = {}
    for kappa in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3):
        score = {a: np.mean(val_ce[a]) + kappa * child_params(a) / p_max for a in archs}
        calibration[kappa] = "-".join(map(str, min(score, key=score.get)))
    print("kappa -> penalised optimum of the retrained validation loss:", calibration)

    results, curves = {}, {}
    for row, kw in ROWS.items():
        per_seed = []
        for seed in SEEDS:
            start = time.process_time()
            t = TangleNASTrainer(TangleNASConfig(seed=seed, retrain_steps=0, output_dir="unused", **kw))
            trace = []
            for _ in range(t.args.max_steps):
                t.step()
                if t.global_step % 10 == 0:
                    trace.append(torch.softmax(t.alpha.detach(), -1)[:, -1].mean().item())
            cpu = time.process_time() - start
            final = t.evaluate()
            arch = t.argmax_arch()
            acc = {a: space[a][SEEDS.index(seed)] for a in archs}
            final.update(
                retrain_test_acc=acc[arch],
                best_test_acc=max(acc.values()),
                rank=ranks(acc)[arch],
                search_cpu_seconds=cpu,
            )
            per_seed.append(final)
            if seed == 0:
                curves[row] = trace
        results[row] = per_seed
    memory = memory_ratio(WIDTHS, 2)
    out = {
        "space": {"-".join(map(str, a)): v for a, v in space.items()},
        "val_ce": {"-".join(map(str, a)): v for a, v in val_ce.items()},
        "calibration": calibration,
        "memory": memory,
        "runs": results,
    }
    write_json_atomic(RESULTS / "tanglenas_digits.json", out)

    print("memory:", memory)
    print("| architecture | #params | test acc, seeds 0-2 (retrained) | mean | val CE mean |")
    print("|---|---|---|---|---|")
    for a in archs:
        accs = ", ".join(f"{v:.4f}" for v in space[a])
        print(f"| {a[0]}-{a[1]} | {child_params(a)} | {accs} | {np.mean(space[a]):.4f} | {np.mean(val_ce[a]):.4f} |")
    print()
    print("| arm | argmax, seeds 0-2 | retrained acc - best (pp) | rank of 9 | p(128) layer 1, 2 (seed 0) | CPU s |")
    print("|---|---|---|---|---|---|")
    for row, per_seed in results.items():
        found = ", ".join(r["argmax_arch"] for r in per_seed)
        gap = ", ".join(f"{100 * (r['retrain_test_acc'] - r['best_test_acc']):+.2f}" for r in per_seed)
        rk = ", ".join(str(r["rank"]) for r in per_seed)
        p = f"{per_seed[0]['p0/128']:.3f}, {per_seed[0]['p1/128']:.3f}"
        cpu = np.mean([r["search_cpu_seconds"] for r in per_seed])
        print(f"| {row} | {found} | {gap} | {rk} | {p} | {cpu:.1f} |")

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = ["-".join(map(str, a)) for a in archs]
    ax1.bar(range(len(archs)), [100 * np.mean(space[a]) for a in archs], yerr=[100 * np.std(space[a]) for a in archs])
    ax1.set_xticks(range(len(archs)), names, rotation=45, fontsize=8)
    ax1.set(ylim=(85, 100), ylabel="retrained test acc (%), mean of 3 seeds", title="the 9 architectures")
    for row, trace in curves.items():
        ax2.plot(np.arange(1, len(trace) + 1) * 10, trace, label=row)
    ax2.axhline(1 / 3, color="grey", lw=0.5)
    ax2.set(xlabel="search iteration", ylabel="mean softmax(alpha) of width 128", title="seed 0")
    ax2.legend(fontsize=7)
    save_figure(fig, RESULTS / "tanglenas_digits.png", dpi=80)


if __name__ == "__main__":
    main()

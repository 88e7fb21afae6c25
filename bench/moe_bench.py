"""Time aux-loss-free MoE balancing against stock training, in one process, on identical batches (budget: 1.03x).

    python bench/moe_bench.py                                   # SFT on tiny:deepseek_v3, aux_free vs none
    python bench/moe_bench.py --model runs/smollm2-moe --steps 10 --per_device_train_batch_size 4
    python bench/moe_bench.py --recipe moe_balance/tiny_sft --steps 60 --out bench/results/moe.json

Two trainers are built from one recipe: ``none`` (the recipe without any ``moe_*`` key: stock TRL) and ``aux_free``
(the recipe's balancing, default ``moe_balance: aux_free``, u = 1e-3). Both are fed the same ``--batches`` batches,
drawn once from the stock trainer's dataloader. A measured step is what the method adds to: the callback's
``on_step_begin`` (zero the loads), ``trainer.training_step`` (forward with the router hooks, loss, backward) and the
callback's ``on_step_end`` (all-reduce of the loads, bias update under no_grad, metrics); stock runs
``training_step`` alone. The optimizer update is left out of both (it costs both the same and would only dilute the
ratio) and so both models keep their initial weights; the biases do move in ``aux_free``. Steps alternate A B, B A,
... after a warm-up; we report the median over ``--steps``, the time ratio (of the medians, and the median of the
per-pair ratios, which is robust to load drift on a shared machine), the balancing share of the step
(``on_step_begin`` + ``on_step_end`` alone) and the peak memory of a step: the CUDA allocator's peak on a GPU, the
growth of the resident set (sampled every millisecond, after malloc_trim) on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PeakRSS, _release_freed_memory, build_trainers, timing_row  # noqa: E402  (as compare.py)
from compare import machine as compare_machine  # noqa: E402

from posttrain.atomic import write_json_atomic
from posttrain.recipes.config import find_recipe, parse_overrides, read_yaml


def build(recipe_name: str, overrides: dict) -> dict:
    """{"none": stock trainer, "aux_free": trainer with the recipe's moe_* keys (aux_free by default)}."""
    path = find_recipe(recipe_name)
    values = {**read_yaml(path.read_text()), **overrides, "report_to": "none", "save_strategy": "no"}
    values.setdefault("moe_balance", "aux_free")
    sources = {key: str(path) for key in values}
    stock = {k: v for k, v in values.items() if not k.startswith("moe_")}
    return build_trainers({"none": stock, values["moe_balance"]: values}, sources, path, tag="moe-bench")


def timed_step(trainer, batch, seed: int) -> tuple[float, float, int]:
    """One measured step: (seconds, seconds spent in the balancing callback, peak bytes)."""
    cb = getattr(trainer, "moe_balance", None)
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    trainer.model.train()

    def now() -> float:
        # CUDA runs asynchronously: without the wait, the backward still running at t2 would count as balancing
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step():
        t0 = now()
        if cb is not None:
            cb.on_step_begin(trainer.args, trainer.state, trainer.control)
        t1 = now()
        trainer.training_step(trainer.model, batch)
        t2 = now()
        if cb is not None:
            trainer.state.global_step += 1
            cb.on_step_end(trainer.args, trainer.state, trainer.control)
        t3 = now()
        return t3 - t0, (t1 - t0) + (t3 - t2)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds, balancing = step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _release_freed_memory()
        with PeakRSS() as rss:
            seconds, balancing = step()
        peak = rss.bytes
    trainer.model.zero_grad(set_to_none=True)
    return seconds, balancing, peak


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{compare_machine()}, load average {load:.2f} at start"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="moe_balance/tiny_sft", help="recipe both trainers are built from")
    parser.add_argument("--model", help="model_name_or_path override (e.g. an upcycled SmolLM2 folder)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled through")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--out", help="JSON results file (default bench/results/moe_balance.json)")
    args, rest = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(rest)
    if args.model:
        overrides["model_name_or_path"] = args.model

    trainers = build(args.recipe, overrides)
    order = list(trainers)
    loader = iter(trainers["none"].get_train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    times = {label: [] for label in order}
    balancing = {label: [] for label in order}
    peaks = {label: [] for label in order}
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        for label in order if i % 2 == 0 else order[::-1]:
            seconds, bal, peak = timed_step(trainers[label], batch, seed=1000 + i)
            if i >= args.warmup:
                times[label].append(seconds)
                balancing[label].append(bal)
                peaks[label].append(peak)

    rows = [
        {
            **timing_row(label, times[label], peaks[label], times["none"]),
            "balancing_ms": 1e3 * statistics.median(balancing[label]),
            # median of the per-step ratios against the stock step run right before/after it: robust to drift
            "paired_ratio": statistics.median(x / y for x, y in zip(times[label], times["none"])),
        }
        for label in order
    ]
    cb = getattr(trainers[order[-1]], "moe_balance", None)
    model = trainers["none"].model
    result = {
        "recipe": args.recipe,
        "model": str(overrides.get("model_name_or_path", "(recipe)")),
        "model_class": type(model).__name__,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "overrides": {k: str(v) for k, v in overrides.items()},
        "machine": machine(),
        "steps": args.steps,
        "warmup": args.warmup,
        "batches": args.batches,
        "rows": rows,
        "last_moe_metrics": {k: v for k, v in (cb.last_metrics if cb else {}).items() if "/layer" not in k},
        "memory": "CUDA allocator peak per step" if torch.cuda.is_available() else "peak RSS growth per step",
    }
    print(f"\nMoE balancing vs stock on {result['machine']}")
    print(
        f"recipe {args.recipe}, model {result['model']} ({result['model_class']}, {result['parameters_m']:.1f}M "
        f"params); median of {args.steps} interleaved steps after {args.warmup} warm-up, {args.batches} batches"
    )
    print(
        f"| variant | median step (ms) | p10 | p90 | balancing (ms) | peak mem (MiB, {result['memory']}) | "
        "time ratio (medians) | paired ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['balancing_ms']:.2f} | {r['peak_mib']:.1f} | {r['ratio']:.3f} | {r['paired_ratio']:.3f} |"
        )
    if result["last_moe_metrics"]:
        print("last step: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result["last_moe_metrics"].items())))
    out = Path(args.out or Path(__file__).parent / "results" / "moe_balance.json")
    write_json_atomic(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

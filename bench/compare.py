"""Time a method against its TRL parent in the same process, on identical batches.

    python bench/compare.py dpo                       # stock DPO vs stock DPO: the harness's own noise check
    python bench/compare.py grpo --steps 30
    python bench/compare.py dpo --model qwen2-0.5b-random --per_device_train_batch_size 8 --max_length 512
    python bench/compare.py dpo --recipe dpo/smollm2-135m --out results.json   # any recipe, any overrides

Both trainers are built from the same recipe (the parent with the method swapped to the parent and keys
it does not know dropped) and fed the same batch, drawn once from the parent's dataloader. A measured step
is ``trainer.training_step`` -- generation (GRPO-like methods), forward, loss and backward -- with the RNG
reseeded identically for both. The optimizer update is left out: it costs both the same, and without it
both models stay at their initial weights, so a generating method samples the same completions for both.
Steps alternate between the two (A B, B A, ...) so that machine drift hits both alike; we report the
median of N steps after a warm-up, and the peak memory of a step: the CUDA allocator's peak on a GPU, the
growth of the process's resident set (sampled every millisecond, after returning freed memory to the OS
with glibc's malloc_trim) on a CPU. For the preference methods (no generation) it also reports the model FLOP
utilisation of the step: (6 N for the policy's forward and backward + 2 N for the reference forward) per real token,
N the parameter count, against the card's dense bf16 peak (attention's own FLOPs are left out: about 4% at 512
tokens for a 0.5B model).

The results file is rewritten after every measured step, so a run stopped by a timeout still leaves its rows
(``"complete": false``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from posttrain.atomic import write_json_atomic
from posttrain.recipes.config import build_recipe, find_recipe, parse_overrides, read_yaml
from posttrain.recipes.train import build_trainer
from posttrain.trainers import METHODS

QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


# A randomly initialised model writes token ids that no real reward can score (the tiny tokenizer decodes almost none
# of Qwen2's 151,936 ids), so every group would get one reward and the methods would do nothing. These two rewards
# read the ids themselves and vary from completion to completion: ``--reward_funcs "[bench_id_parity]"`` gives THR
# mixed groups, two of them give constrained RLHF two live streams. Registered by this script only.
def bench_id_parity(completion_ids, **kwargs) -> list[float]:
    """1.0 when the sum of the completion's token ids is even, else 0.0: a fair coin per completion."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def bench_even_id_fraction(completion_ids, **kwargs) -> list[float]:
    """The fraction of the completion's token ids that are even, in [0, 1]."""
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


BENCH_REWARDS = {
    "bench_id_parity": (
        "bench only: 1 if the sum of the completion's token ids is even",
        lambda config: bench_id_parity,
    ),
    "bench_even_id_fraction": ("bench only: fraction of even token ids", lambda config: bench_even_id_fraction),
}

# Dense bf16 peak of the cards we report MFU on (vendor data sheets, without sparsity), in FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def preference_step_flops(trainer, batch) -> float | None:
    """Model FLOPs of one DPO-style training step on ``batch`` (None for methods that generate): 6 N per real token
    for the policy's forward and backward, 2 N more when a reference model runs a forward."""
    if "input_ids" not in batch or "completion_mask" not in batch:
        return None
    n = sum(p.numel() for p in trainer.model.parameters())
    tokens = int(batch["attention_mask"].sum())
    return (6 + (2 if getattr(trainer, "ref_model", None) is not None else 0)) * n * tokens


def random_qwen2_05b() -> str:
    """A randomly initialised Qwen2-0.5B-shaped model (bf16 on GPU) with the tiny tokenizer, cached once."""
    from transformers import Qwen2Config

    from posttrain.paths import cache_dir
    from posttrain.recipes.tiny import build_once, build_tokenizer, init_model, save_pretrained_on_any_rank

    def build(out: Path) -> None:
        tokenizer = build_tokenizer()
        config = Qwen2Config(**QWEN2_05B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        save_pretrained_on_any_rank(init_model(config, seed=0), out)
        tokenizer.save_pretrained(out)

    final = cache_dir() / "bench" / "qwen2-0.5b-random"
    return str(build_once(final, build, lambda d: (d / "config.json").is_file() and (d / "tokenizer.json").is_file()))


class PeakRSS:
    """Peak growth of the resident set while the block runs, sampled every millisecond in a thread."""

    def __init__(self):
        self.process, self.peak = psutil.Process(), 0

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.bytes = self.peak - self.start


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure is only noisier
        pass


def timing_row(label: str, seconds: list, peaks: list, base_seconds: list) -> dict:
    """A results-table row: median and p10/p90 step time (ms), peak memory (MiB), time ratio of the medians."""
    ts = sorted(seconds)
    return {
        "variant": label,
        "median_ms": 1e3 * statistics.median(ts),
        "p10_ms": 1e3 * ts[len(ts) // 10],
        "p90_ms": 1e3 * ts[(9 * len(ts)) // 10],
        "peak_mib": max(peaks) / 2**20,
        "ratio": statistics.median(ts) / statistics.median(base_seconds),
    }


def timed_step(trainer, batch, seed: int) -> tuple[float, int]:
    """One training_step on ``batch``: seconds and peak bytes."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    trainer.model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        torch.cuda.synchronize()
        seconds, peak = time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    else:
        _release_freed_memory()  # so the resident set starts from what is live, not from old free lists
        with PeakRSS() as rss:
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            seconds = time.perf_counter() - start
        peak = rss.bytes
    trainer.model.zero_grad(set_to_none=True)
    return seconds, peak


def build_pair(method: str, recipe_name: str, overrides: dict) -> dict:
    """{"parent": trainer, method: trainer} from one recipe."""
    path = find_recipe(recipe_name)
    values = {**read_yaml(path.read_text()), **overrides, "method": method, "report_to": "none", "save_strategy": "no"}
    sources = {key: str(path) for key in values}
    parent = METHODS[method].parent or method
    parent_cls = METHODS[parent].config_cls
    parent_values = {k: v for k, v in values.items() if k == "method" or k in _known_keys(parent_cls)}
    dropped = sorted(set(values) - set(parent_values))
    if dropped:
        print(f"parent '{parent}' does not take {', '.join(dropped)}; dropped for it")
    parent_values["method"] = parent
    return build_trainers({f"{parent} (parent)": parent_values, method: values}, sources, path)


def build_trainers(variants: dict, sources: dict, path, tag: str = "bench") -> dict:
    """{label: trainer built from that variant's recipe values}, ready for ``training_step`` outside ``train()``."""
    trainers = {}
    for label, vals in variants.items():
        recipe = build_recipe(vals, sources, str(path))
        recipe.config.output_dir = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"posttrain-{tag}-{os.getpid()}")
        trainer = build_trainer(recipe)
        # set by Trainer's training loop, which we do not run; training_step divides the loss by it
        trainer.current_gradient_accumulation_steps = recipe.config.gradient_accumulation_steps
        trainers[label] = trainer
    return trainers


def summary(trainers: dict, order: list, times: dict, peaks: dict, flops: dict) -> dict:
    """The results so far: one row per variant, the method's own metrics, and whether the method did any work."""
    rows = [timing_row(label, times[label], peaks[label], times[order[0]]) for label in order]
    for row in rows:
        step_flops, peak = flops[row["variant"]], peak_flops()
        row["tflops"] = step_flops / row["median_ms"] * 1e3 / 1e12 if step_flops else None
        row["mfu"] = row["tflops"] * 1e12 / peak if step_flops and peak else None
    # the metrics the method logs beyond its parent's (e.g. how many THR groups were mixed), plus the reward spread
    parent_keys = set(trainers[order[0]]._metrics["train"]) if hasattr(trainers[order[0]], "_metrics") else set()
    method_metrics = {
        label: {
            k: statistics.mean(v)
            for k, v in trainer._metrics["train"].items()
            if v and (k not in parent_keys or k in ("reward_std", "frac_reward_zero_std"))
        }
        for label, trainer in trainers.items()
        if hasattr(trainer, "_metrics")
    }
    # a ratio is a measure of the method only where the method did its work
    not_measured = None
    method = method_metrics.get(order[-1], {})
    if "thr/mixed_groups" in method and method["thr/mixed_groups"] == 0:
        not_measured = "no THR group was mixed: THR did no work and the time ratio does not measure it"
    elif method.get("reward_std") == 0:
        not_measured = (
            "every completion got the same reward: the method did no work and the time ratio does not measure it"
        )
    return {"rows": rows, "method_metrics": method_metrics, "not_measured": not_measured}


def _known_keys(config_cls) -> set[str]:
    import dataclasses

    from trl import ModelConfig

    from posttrain.data import DataArguments

    return {f.name for cls in (ModelConfig, DataArguments, config_cls) for f in dataclasses.fields(cls)}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", help="a registered method; it is compared with its TRL parent")
    parser.add_argument("--recipe", help="recipe to build both trainers from (default <method>/tiny)")
    parser.add_argument(
        "--model", help="model_name_or_path override; 'qwen2-0.5b-random' builds a random Qwen2-0.5B shape"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="JSON results file (default bench/results/<method>.json)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.model:
        overrides["model_name_or_path"] = random_qwen2_05b() if args.model == "qwen2-0.5b-random" else args.model
    recipe_name = args.recipe or f"{args.method}/tiny"
    from posttrain.trainers.rewards import REWARDS

    REWARDS.update(BENCH_REWARDS)

    trainers = build_pair(args.method, recipe_name, overrides)
    first = next(iter(trainers.values()))
    batch = next(iter(first.get_train_dataloader()))
    times = {label: [] for label in trainers}
    peaks = {label: [] for label in trainers}
    order = list(trainers)
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.method}.json")
    result = {
        "method": args.method,
        "recipe": recipe_name,
        "overrides": {k: str(v) for k, v in overrides.items()},
        "machine": machine(),
        "steps": args.steps,
        "warmup": args.warmup,
        "memory": "CUDA allocator peak per step" if torch.cuda.is_available() else "peak RSS growth per step",
    }
    flops = {label: preference_step_flops(trainer, batch) for label, trainer in trainers.items()}
    for i in range(args.warmup + args.steps):
        for label in order if i % 2 == 0 else order[::-1]:
            seconds, peak = timed_step(trainers[label], batch, seed=1000 + i)
            if i >= args.warmup:
                times[label].append(seconds)
                peaks[label].append(peak)
        if i >= args.warmup:  # a run stopped by a timeout still leaves the steps it measured
            write_json_atomic(
                out,
                {
                    **result,
                    **summary(trainers, order, times, peaks, flops),
                    "complete": i + 1 == args.warmup + args.steps,
                },
            )
    result = {**result, **summary(trainers, order, times, peaks, flops), "complete": True}
    rows = result["rows"]
    print(f"\n{args.method} vs its parent on {result['machine']}; recipe {recipe_name}; median of {args.steps} steps")
    print(f"| variant | median step (ms) | p10 | p90 | peak mem (MiB, {result['memory']}) | time ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['peak_mib']:.1f} "
            f"| {r['ratio']:.3f} |"
        )
    for r in rows:
        if r.get("mfu") is not None:
            print(
                f"{r['variant']}: {r['tflops']:.1f} TFLOP/s of model FLOPs, MFU {100 * r['mfu']:.1f}% of the "
                f"{peak_flops() / 1e12:.0f} "
                "TFLOP/s bf16 peak"
            )
    for label, values in result["method_metrics"].items():
        if values:
            print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items())))
    if result.get("not_measured"):
        print(f"NOT MEASURED: {result['not_measured']}")
    write_json_atomic(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

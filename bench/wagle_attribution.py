"""Time and peak memory of WAGLE's phase 1 (the attribution mask) on SmolLM2-135M, CPU or GPU.

    python bench/wagle_attribution.py                      # 64 forget + 64 retain examples, batch 4
    python bench/wagle_attribution.py --examples 128 --batch 8

Builds the ``wagle/smollm2-135m_graddiff`` trainer on the base SmolLM2-135M-Instruct (the cost does not depend on the
weights) and times ``WAGLETrainer.setup_mask``: forget and retain gradient sums over the paired batches, the scores
and the global top-ratio threshold. Memory: what attribution adds on top of the loaded model (growth of the resident
set, sampled every ms, on a CPU; the CUDA allocator's peak on a GPU), plus the model's own size, against the
budget set for the method: the model plus three fp32 copies of its parameters. Phase 1 keeps two: the forget sum,
then the retain sum
accumulating in the parameters' .grad; the scores replace the sums as they are made. Activations come on top.
The model is paged in before the measure starts (on a CPU its safetensors weights are memory-mapped, and the first
forward would otherwise count them a second time); the process's absolute peak resident set is printed as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PeakRSS, _release_freed_memory, machine, random_qwen2_05b  # noqa: E402


def _return_freed_memory_at_once() -> None:
    # glibc keeps freed heap blocks for reuse (and raises its mmap threshold as blocks are freed), so on a CPU the
    # resident set stays near its high-water mark of *freed* memory. Blocks over 64 KiB from plain mmap, returned on
    # free, make the resident set follow the live tensors (what the budget is about) at the price of more system time.
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the measure is only noisier
        return
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also turns the dynamic threshold off)
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="forget examples (and as many retain examples)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--model",
        default="HuggingFaceTB/SmolLM2-135M-Instruct",
        help="model_name_or_path; 'qwen2-0.5b-random' builds a random Qwen2-0.5B shape (no download)",
    )
    parser.add_argument("--out", default="bench/results/wagle_attribution.json")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc as it is: freed heap memory stays resident, so the growth overstates live memory",
    )
    args = parser.parse_args(argv)
    if not args.malloc_default and not torch.cuda.is_available():
        _return_freed_memory_at_once()

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    cuda = torch.cuda.is_available()
    recipe = load_recipe(
        "wagle/smollm2-135m_graddiff",
        {
            "model_name_or_path": random_qwen2_05b() if args.model == "qwen2-0.5b-random" else args.model,
            "output_dir": "/tmp/posttrain-bench-wagle",
            "per_device_train_batch_size": args.batch,
            "attribution_batches": -(-args.examples // args.batch),
            "report_to": "none",
            "save_strategy": "no",
        },
    )
    trainer = build_trainer(recipe)
    params = sum(p.numel() for p in trainer.model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    # safetensors weights on a CPU are memory-mapped and paged in by the first forward: read every parameter once so
    # the model is resident before the measure starts (otherwise the growth counts the model a second time)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.sum()
    _release_freed_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # the model (and whatever else is live)
    with PeakRSS() as rss:  # growth over the process with the model loaded
        start = time.perf_counter()
        trainer.setup_mask()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    growth = (torch.cuda.max_memory_allocated() - base) if cuda else rss.bytes
    peak = model_bytes + growth  # the model plus what attribution adds on top of it
    budget = model_bytes + 3 * 4 * params
    n_forget = min(args.examples, len(trainer.forget_rows))
    result = {
        "machine": machine(),
        "model": args.model,
        "malloc": "glibc default" if args.malloc_default else "freed memory returned at once",
        "examples": n_forget,
        "batch": args.batch,
        "seconds": seconds,
        "peak_mib": peak / 2**20,
        "growth_mib": growth / 2**20,
        "model_mib": model_bytes / 2**20,
        "budget_mib": budget / 2**20,
        "within_budget": peak <= budget,
        "process_rss_before_mib": rss.start / 2**20,
        "process_peak_rss_mib": rss.peak / 2**20,
        "density": trainer.mask_info["density"],
    }
    print(
        f"WAGLE attribution of {args.model} on {result['machine']}: {n_forget} forget + {n_forget} retain examples, "
        f"batch {args.batch}, malloc: {result['malloc']}"
    )
    print(
        "| time (s) | model + attribution's peak growth (MiB) | model (MiB) | budget: model + 3 fp32 copies (MiB) "
        "| within |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {seconds:.1f} | {result['peak_mib']:.0f} | {result['model_mib']:.0f} | {result['budget_mib']:.0f} | "
        f"{'yes' if result['within_budget'] else 'NO'} |"
    )
    print(
        f"process resident set: {result['process_rss_before_mib']:.0f} MiB before (libraries + model), "
        f"{result['process_peak_rss_mib']:.0f} MiB at the peak"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

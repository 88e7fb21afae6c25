"""Time a method against its TRL parent as two real launches (DeepSpeed allows one engine per process).

    python bench/launch_compare.py dpo --config accelerate_configs/zero2.yaml --max_steps 20 [--key value ...]

Runs ``accelerate launch --config_file CONFIG -m posttrain train <recipe>`` once with the parent method
and once with the method, same overrides, and compares the Trainer's steps per second (model loading
excluded) from each run's ``run_summary.json``. Noisier than ``compare.py``; use it for ZeRO/FSDP.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from posttrain.trainers import METHODS

ROOT = Path(__file__).resolve().parents[1]


def run(method: str, recipe: str, config: str, processes: int, overrides: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--num_processes",
        str(processes),
        "-m",
        "posttrain",
        "train",
        recipe,
        "--method",
        method,
        "--output_dir",
        str(out),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "run_summary.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("--recipe")
    parser.add_argument("--config", default="accelerate_configs/zero2.yaml")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--out", help="JSON results file")
    args, rest = parser.parse_known_args(argv)
    parent = METHODS[args.method].parent or args.method
    recipe = args.recipe or f"{args.method}/tiny"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method in ((f"{parent} (parent)", parent), (args.method, args.method)):
            summary = run(method, recipe, args.config, args.num_processes, rest, Path(tmp) / label.split()[0])
            steps = summary["global_step"]
            rows.append(
                {
                    "variant": label,
                    "steps": steps,
                    "seconds": summary["train_runtime_s"],
                    "steps_per_s": steps / summary["train_runtime_s"],
                    "distributed_type": summary["distributed_type"],
                    "zero_stage": summary["zero_stage"],
                }
            )
    for row in rows:
        row["time_ratio"] = rows[0]["steps_per_s"] / row["steps_per_s"]
    print(f"\n{args.method} vs its parent, {args.config}, {args.num_processes} process(es), recipe {recipe}")
    print("| variant | steps | train seconds | steps/s | time ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['steps']} | {r['seconds']:.2f} | {r['steps_per_s']:.3f} | {r['time_ratio']:.3f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"method": args.method, "config": args.config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OptiBench on SmolLM2-135M-Instruct, zero-shot and few-shot: the eval recipe ``eval/smollm2-135m_optibench`` run
through the eval harness (``posttrain eval``), then one figure of both.

Question: how far is a 135M instruction model from writing runnable solver code for small optimization word
problems? (OptiBench, arXiv 2407.09887; the 12 problems shipped with posttrain, PuLP, the official two-turn
protocol, 3 s sandboxed runs, |pred - gt| < 1e-4 on every asked value.)

    posttrain eval eval/smollm2-135m_optibench                                  # zero-shot (~8 min on 2 loaded cores)
    posttrain eval eval/smollm2-135m_optibench --task_config '{optibench: {prompt: fewshot}}' \\
        --output runs/eval-smollm2-135m-optibench-fewshot
    .venv/bin/python experiments/optibench_smollm2.py    # both (cached results are reused), then the figure

Writes ``experiments/results/optibench_smollm2.json`` (metrics and per-problem statuses of both runs) and
``.png`` (accuracy per type and code pass rate; the sandbox status of every problem).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from posttrain.atomic import write_json_atomic  # noqa: E402
from posttrain.evals.harness import load_eval_recipe, run_eval  # noqa: E402
from posttrain.evals.optibench import TYPES  # noqa: E402
from posttrain.plots import pyplot, save_figure

RECIPE = "eval/smollm2-135m_optibench"
RUNS = {
    "zeroshot": {},
    "fewshot": {"tasks": {"optibench": {"prompt": "fewshot"}}, "output": "runs/eval-smollm2-135m-optibench-fewshot"},
}
OUT = Path(__file__).resolve().parent / "results"
COLORS = {
    "ok": "tab:green",
    "not_optimal": "tab:olive",
    "error": "tab:red",
    "timeout": "tab:orange",
    "memory_limit": "tab:purple",
    "denied": "tab:brown",
}


def main() -> None:
    summary = {}
    for name, overrides in RUNS.items():
        report = run_eval(load_eval_recipe(RECIPE, overrides))
        model = report["models"][0]
        out = report["results"][model]["optibench"]
        keep = ("index", "type", "status", "error", "predicted", "correct", "code_passed", "seconds")
        summary[name] = {
            "model": model,
            "config": out["config"],
            "metrics": out["metrics"],
            "statuses": out["statuses"],
            "problems": [{k: p.get(k) for k in keep} for p in out["problems"]],
        }
    write_json_atomic(OUT / "optibench_smollm2.json", summary)
    plot(summary, OUT / "optibench_smollm2.png")
    for name, s in summary.items():
        print(name, {k: round(v, 4) for k, v in s["metrics"].items()}, s["statuses"])


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()

    metrics = ["accuracy", *[f"accuracy/{t}" for t in TYPES], "code_pass_rate"]
    statuses = sorted({s for run in summary.values() for s in run["statuses"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(summary)
    for i, (name, run) in enumerate(summary.items()):
        xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(metrics))]
        values = [run["metrics"].get(m, 0.0) for m in metrics]
        left.bar(xs, values, width, label=name, color=f"C{i}")
        for x, v in zip(xs, values):
            left.text(x, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
        bottom = 0
        for k, status in enumerate(statuses):
            count = run["statuses"].get(status, 0)
            right.bar(
                i, count, 0.6, bottom=bottom, color=COLORS.get(status, f"C{k + 4}"), label=status if i == 0 else None
            )
            bottom += count
    left.set_xticks(range(len(metrics)), [m.replace("accuracy/", "acc/") for m in metrics], rotation=20, fontsize=8)
    left.set_ylim(0, 1.08)
    left.set_title("SmolLM2-135M-Instruct on the 12 shipped OptiBench problems", fontsize=9)
    left.legend(fontsize=8)
    right.set_xticks(range(len(summary)), list(summary))
    right.set_ylabel("problems")
    right.set_title("sandbox status of each program", fontsize=9)
    right.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

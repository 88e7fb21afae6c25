"""Deep Ignorance strong vs weak filter on a generated benign corpus (arXiv 2508.06601), CPU, seconds.

Question: does the classifier stage of the cascade (weak filter) keep the blocklist's recall of the target topic
while removing far fewer off-topic documents than the blocklist alone (strong filter)?

Setting: ``builtin:topic_corpus`` (volcanology as a benign stand-in target, ~15%; near misses sharing its words,
~25%; unrelated documents), 2000 documents to filter and a 2000-document labelled split drawn the same way with
another random stream. The keyword list is mined from the labelled split (pos_ratio > 0.4, >= 5 target
documents); the classifier (TF-IDF + logistic regression, threshold 0.5) is trained on it. Both filters use the
package's own ``CascadeFilter``; the weak filter replaces what it removes by approved escalations.

Pass criteria (also checked by tests/data/test_cascade_filter.py on seed 0): FPR(weak) <= 0.5 FPR(strong);
recall(weak) >= 0.9 recall(strong); classifier invocations = escalated documents; |D_out| = |D_in| when enough
approved escalations exist.

    .venv/bin/python experiments/cascade_filter.py     # 5 seeds: table, results/cascade_filter.json and .png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from posttrain.atomic import write_json_atomic
from posttrain.data.cascade_filter import (
    BlocklistStage,
    CascadeFilter,
    ClassifierStage,
    mine_blocklist,
    report_table,
    select_keywords,
)
from posttrain.data.generators import topic_corpus
from posttrain.plots import pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"


def run_seed(seed: int, num_samples: int) -> dict:
    corpus = topic_corpus(num_samples, seed=seed)
    labelled, data = corpus["labelled"], corpus["train"]
    keywords = select_keywords(mine_blocklist(labelled["text"], labelled["is_filter_target"], min_docs=5), 0.4)
    classifier = ClassifierStage.train(labelled["text"], labelled["is_filter_target"], seed=seed)
    out = {"seed": seed, "keywords": len(keywords)}
    for mode in ("strong", "weak"):
        calls = classifier.calls
        result = CascadeFilter([BlocklistStage(keywords, 2), classifier], mode, keep_size=True, seed=seed).apply(data)
        groups = {
            g: sum(1 for x, f in zip(data["group"], result.annotated["combined_filter"]) if f and x == g)
            for g in ("target", "near_miss", "unrelated")
        }
        out[mode] = {**result.report, "classifier_calls": classifier.calls - calls, "filtered_by_group": groups}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num_samples", type=int, default=2000)
    args = parser.parse_args()
    start = time.time()
    runs = [run_seed(seed, args.num_samples) for seed in range(args.seeds)]
    print(
        "| seed | keywords | strong % filtered | strong recall | strong FPR | weak % filtered | weak recall | "
        "weak FPR | escalated | classifier calls | weak output rows | FPR ratio | recall ratio |"
    )
    print("|" + "---|" * 13)
    for r in runs:
        s, w = r["strong"]["stages"]["combined_filter"], r["weak"]["stages"]["combined_filter"]
        ratio = w["fpr"] / s["fpr"] if s["fpr"] else float("nan")
        print(
            f"| {r['seed']} | {r['keywords']} | {s['percent_filtered']:.2f} | {s['recall']:.3f} | {s['fpr']:.4f} | "
            f"{w['percent_filtered']:.2f} | {w['recall']:.3f} | {w['fpr']:.4f} | "
            f"{r['weak']['stages']['word_filter']['filtered_documents']} | {r['weak']['classifier_calls']} | "
            f"{r['weak']['output_documents']} | {ratio:.3f} | {w['recall'] / s['recall']:.3f} |"
        )
    print(f"\nseed 0, weak filter, per stage:\n{report_table(runs[0]['weak'])}")
    print(
        f"seed 0, filtered by group: strong {runs[0]['strong']['filtered_by_group']}, "
        f"weak {runs[0]['weak']['filtered_by_group']}"
    )
    write_json_atomic(RESULTS / "cascade_filter.json", runs)
    plot(runs, RESULTS / "cascade_filter.png")
    print(f"{time.time() - start:.1f} s; wrote {RESULTS / 'cascade_filter.json'} and .png")


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    stages = runs[0]["weak"]["stages"]
    names = list(stages)
    metrics = ("percent_filtered", "precision", "recall", "fpr")
    width = 0.2
    for j, metric in enumerate(metrics):
        scale = 1 if metric == "percent_filtered" else 100
        left.bar(
            [i + j * width for i in range(len(names))],
            [stages[n][metric] * scale for n in names],
            width,
            label=metric.replace("_", " "),
        )
    left.set_xticks([i + 1.5 * width for i in range(len(names))], names)
    left.set_ylabel("%")
    left.set_title("weak filter, per stage (seed 0)")
    left.set_ylim(0, 125)
    left.legend(fontsize=8, ncol=4, loc="upper center")
    for mode, marker in (("strong", "o"), ("weak", "s")):
        right.scatter(
            [r[mode]["stages"]["combined_filter"]["fpr"] * 100 for r in runs],
            [r[mode]["stages"]["combined_filter"]["recall"] * 100 for r in runs],
            marker=marker,
            label=mode,
        )
    right.set_xlabel("FPR (%)")
    right.set_ylabel("recall (%)")
    right.set_title(f"strong vs weak, {len(runs)} seeds")
    right.legend()
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()

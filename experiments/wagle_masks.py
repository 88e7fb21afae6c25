"""WAGLE mask sanity experiment (arXiv 2410.17509 in miniature): which weights should unlearning touch? CPU, minutes.

Question: at the same mask ratio, does the WAGLE attribution mask give a better forget/retain trade-off than a random
or a magnitude mask, i.e. a lower forget accuracy at the same retain accuracy?

Setting. Data: ``builtin:fictitious_authors`` with 200 QA rows (20 invented authors, 10 QA each; the split seed is the
run seed): the model is trained on ``full`` (18 authors), then unlearns ``forget10`` (2 authors, 20 QA) while keeping
``retain`` (16 authors, 160 QA); ``holdout`` (2 authors never trained on) gives the accuracy of a model that never knew
the answers (~0.54: template words and the author's name, copied from the question, are predictable) and the
non-member side of a loss-based membership-inference AUC. Model: the tiny local Llama (2 layers, d = 64, 107k
parameters, 512-token BPE; ``posttrain.recipes.tiny``, seeded init), trained from scratch on ``full`` with AdamW
(lr 3e-3, batch 32, 300 steps: answer-token accuracy ~1.0 on full). Unlearning: GradDiff (-CE_f + CE_r, the
package's ``graddiff_loss``), AdamW lr 5e-4 without weight decay, 60 steps, clip 1.0, then the mask
(``apply_gradient_mask``), then the step; each step takes all 20 forget rows and 20 retain rows from the trainer's
retain stream (``stream_indices``), i.e. the loop that tests/trainers/test_wagle.py shows equal to ``WAGLETrainer``.
Masks at the same ratio (``build_mask``): wagle (official gamma 1e-6), magnitude and random at ratios 0.5 and 0.8,
snip (|theta g_f|) at 0.5, plus dense (every weight). Phase 1 as in the trainer: forget rows in batches of 10, each
paired with 10 retain rows.

Metric: every 3rd step records answer-token accuracy on forget and on half of the retain questions (teacher-forced
argmax, the definition of ``posttrain.evals.unlearning``) and the MIA AUC forget-vs-holdout. A run is read where its
retain accuracy has first fallen by a drop d below its start (linear interpolation between evaluations), d in DROPS:
"forget accuracy at equal retain accuracy". A run that never falls that far has no value there (counted as missed,
not averaged). Lower forget accuracy at the same drop is better; ~0.54 (holdout) means the forget authors look unseen.

    .venv/bin/python experiments/wagle_masks.py            # 3 seeds: table, results/wagle_masks.json + .png (~6 min)
    .venv/bin/python experiments/wagle_masks.py --quick    # 1 seed, ratio 0.5, QUICK settings (~1 min), writes nothing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from posttrain.data.generators import fictitious_authors
from posttrain.data.unlearning import collate, encode_row, stream_indices
from posttrain.evals.report import finish_experiment
from posttrain.evals.unlearning import auc
from posttrain.plots import pyplot, save_figure
from posttrain.recipes.tiny import make_tiny
from posttrain.trainers.gradient_masks import accumulate_gradients, apply_gradient_mask, mask_density
from posttrain.trainers.wagle import build_mask, graddiff_loss

NUM_SAMPLES = 200
MAX_LENGTH = 128
PRETRAIN = dict(steps=300, lr=3e-3, batch=32)
UNLEARN = dict(steps=60, lr=5e-4, batch=20, max_grad_norm=1.0, eval_every=3)
QUICK = dict(pretrain_steps=200, steps=40, lr=1e-3, eval_every=4)
ATTRIBUTION_BATCH = 10
MASKS = {  # name -> (build_mask method, gamma)
    "wagle": ("wagle", 1e-6),
    "magnitude": ("magnitude", 1e-6),
    "random": ("random", 1e-6),
    "snip": ("snip", 1e-6),
}
MAIN_MASKS = ("wagle", "magnitude", "random")  # at every ratio; the others at the first ratio only
DROPS = (0.02, 0.05, 0.10)  # read every run where retain accuracy has fallen this much below its start


# --------------------------------------------------------------------------------------------------- data


def make_data(seed):
    model, tokenizer = make_tiny("llama", seed=seed)
    splits = fictitious_authors(NUM_SAMPLES, seed)
    rows = {
        name: [encode_row(tokenizer, r, MAX_LENGTH) for r in splits[name]]
        for name in ("full", "forget10", "retain", "holdout")
    }
    rows["retain_eval"] = rows["retain"][::2]  # every author, half of the questions: halves the evaluation cost
    return model, tokenizer.pad_token_id, rows


def batches(rows, pad, size=64):
    return [collate(rows[i : i + size], pad) for i in range(0, len(rows), size)]


@torch.no_grad()
def evaluate(model, eval_batches):
    """Answer-token accuracy per set, and per-row mean CE (for the MIA AUC) per set."""
    model.eval()
    out = {}
    for name, bs in eval_batches.items():
        correct = total = 0
        losses = []
        for b in bs:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            valid = labels != -100
            correct += int(((logits.argmax(-1) == labels) & valid).sum())
            total += int(valid.sum())
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
            losses += ((ce * valid).sum(1) / valid.sum(1)).tolist()
        out[name] = (correct / total, losses)
    model.train()
    return out


def snapshot(model, eval_batches):
    e = evaluate(model, eval_batches)
    return {
        "forget_acc": e["forget10"][0],
        "retain_acc": e["retain_eval"][0],
        "holdout_acc": e["holdout"][0],
        "mia_auc": auc([-x for x in e["forget10"][1]], [-x for x in e["holdout"][1]]),
    }


# ------------------------------------------------------------------------------------------------- phases


def pretrain(model, rows, pad, seed, steps=PRETRAIN["steps"]):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(rows["full"]), (PRETRAIN["batch"],), generator=g).tolist()
        model(**collate([rows["full"][i] for i in idx], pad)).loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def phase1_mask(model, rows, pad, name, ratio, seed):
    method, gamma = MASKS.get(name, ("dense", 1e-6))
    gf = gr = None
    if method in ("wagle", "snip"):
        forget, retain = rows["forget10"], rows["retain"]
        n = -(-len(forget) // ATTRIBUTION_BATCH)
        fb = [collate(forget[j * ATTRIBUTION_BATCH : (j + 1) * ATTRIBUTION_BATCH], pad) for j in range(n)]
        rb = [
            collate(
                [retain[i] for i in stream_indices(len(retain), seed, j * ATTRIBUTION_BATCH, ATTRIBUTION_BATCH)], pad
            )
            for j in range(n)
        ]
        gf = accumulate_gradients(model, fb)
        gr = accumulate_gradients(model, rb) if method == "wagle" else None
    return build_mask(model, method, ratio, gf, gr, gamma=gamma, seed=seed)


def unlearn(model, base, rows, pad, eval_batches, mask, seed, steps, lr, eval_every):
    model.load_state_dict(base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    forget = collate(rows["forget10"], pad)
    curve = [{"step": 0, **snapshot(model, eval_batches)}]
    for k in range(steps):
        retain = collate(
            [
                rows["retain"][i]
                for i in stream_indices(len(rows["retain"]), seed, k * UNLEARN["batch"], UNLEARN["batch"])
            ],
            pad,
        )
        graddiff_loss(model(**forget).loss, model(**retain).loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), UNLEARN["max_grad_norm"])
        apply_gradient_mask(model, mask)
        opt.step()
        opt.zero_grad()
        if (k + 1) % eval_every == 0 or k + 1 == steps:
            curve.append({"step": k + 1, **snapshot(model, eval_batches)})
    return {key: [c[key] for c in curve] for key in curve[0]}


def at_drop(curve, drop):
    """forget accuracy, MIA AUC and step where retain accuracy first falls ``drop`` below its start (linear
    interpolation between evaluations), else None."""
    retain = curve["retain_acc"]
    level = retain[0] - drop
    for i in range(1, len(retain)):
        if retain[i] <= level:
            w = (retain[i - 1] - level) / (retain[i - 1] - retain[i])
            return {
                key: curve[key][i - 1] + w * (curve[key][i] - curve[key][i - 1])
                for key in ("forget_acc", "mia_auc", "step")
            }
    return None


# ---------------------------------------------------------------------------------------------------- run


def run(
    seeds=(0, 1, 2),
    ratios=(0.5, 0.8),
    masks=tuple(MASKS),
    steps=UNLEARN["steps"],
    lr=UNLEARN["lr"],
    eval_every=UNLEARN["eval_every"],
    pretrain_steps=PRETRAIN["steps"],
    log=print,
):
    torch.set_num_threads(1)
    runs = []
    plan = [(1.0, "dense")] + [(r, m) for i, r in enumerate(ratios) for m in masks if i == 0 or m in MAIN_MASKS]
    for seed in seeds:
        t0 = time.time()
        model, pad, rows = make_data(seed)
        base = pretrain(model, rows, pad, seed, pretrain_steps)
        eval_batches = {name: batches(rows[name], pad) for name in ("forget10", "retain_eval", "holdout")}
        start = snapshot(model, eval_batches)
        log(
            f"seed {seed}: pretrained in {time.time() - t0:.0f} s: forget {start['forget_acc']:.3f} retain "
            f"{start['retain_acc']:.3f} holdout {start['holdout_acc']:.3f} mia {start['mia_auc']:.2f}"
        )
        for ratio, name in plan:
            model.load_state_dict(base)
            mask = phase1_mask(model, rows, pad, name, ratio, seed)
            curve = unlearn(model, base, rows, pad, eval_batches, mask, seed, steps, lr, eval_every)
            runs.append(
                {
                    "seed": seed,
                    "mask": name,
                    "ratio": ratio,
                    "density": mask_density(mask),
                    "curve": curve,
                    "levels": {str(drop): at_drop(curve, drop) for drop in DROPS},
                }
            )
            r = runs[-1]["levels"][str(DROPS[1])]
            where = "never reached" if r is None else f"{r['forget_acc']:.3f} (step {r['step']:.1f})"
            log(f"  {name:12s} ratio {ratio:.2f}: forget acc at retain -{DROPS[1]}: {where}")
    return {
        "config": {
            "seeds": list(seeds),
            "ratios": list(ratios),
            "masks": list(masks),
            "steps": steps,
            "lr": lr,
            "eval_every": eval_every,
            "pretrain_steps": pretrain_steps,
            "drops": list(DROPS),
            "num_samples": NUM_SAMPLES,
            "pretrain": PRETRAIN,
            "unlearn": UNLEARN,
        },
        "runs": runs,
        "table": summarize(runs),
    }


def summarize(runs):
    """Per (ratio, mask) and level: mean forget acc / MIA AUC / step over the seeds that reached the level."""
    table = {}
    for r in runs:
        row = table.setdefault(f"{r['ratio']:.2f} {r['mask']}", {"ratio": r["ratio"], "mask": r["mask"], "levels": {}})
        for level, value in r["levels"].items():
            cell = row["levels"].setdefault(level, {"forget_acc": [], "mia_auc": [], "step": [], "missing": 0})
            if value is None:
                cell["missing"] += 1
            else:
                for key in ("forget_acc", "mia_auc", "step"):
                    cell[key].append(value[key])
    for row in table.values():
        for cell in row["levels"].values():
            for key in ("forget_acc", "mia_auc", "step"):
                values = cell.pop(key)
                cell[key] = sum(values) / len(values) if values else None
                if key == "forget_acc":
                    cell["per_seed"] = values
    return table


def paired_differences(result, drop, reference="wagle"):
    """Per ratio and baseline: mean and standard error over seeds of forget_acc(baseline) - forget_acc(reference)
    (positive: the reference forgets more at the same retain accuracy); seeds where either run missed the level drop."""
    by = {(r["seed"], r["ratio"], r["mask"]): r["levels"][str(drop)] for r in result["runs"]}
    out = {}
    for ratio in result["config"]["ratios"]:
        for mask in result["config"]["masks"] + ["dense"]:
            if mask == reference:
                continue
            diffs = []
            for seed in result["config"]["seeds"]:
                a, b = by.get((seed, 1.0 if mask == "dense" else ratio, mask)), by.get((seed, ratio, reference))
                if a is not None and b is not None:
                    diffs.append(a["forget_acc"] - b["forget_acc"])
            if diffs:
                mean = sum(diffs) / len(diffs)
                se = (
                    (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
                    if len(diffs) > 1
                    else float("nan")
                )
                out[f"{ratio:.2f} {mask}"] = {"mean": mean, "se": se, "n": len(diffs)}
    return out


def format_table(result):
    lines = [
        "| ratio | mask | "
        + " | ".join(f"forget acc @ retain -{d}" for d in DROPS)
        + f" | MIA AUC @ -{DROPS[1]} | step @ -{DROPS[1]} |",
        "|---|---|" + "---|" * (len(DROPS) + 2),
    ]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for row in result["table"].values():
        cells = []
        for d in DROPS:
            c = row["levels"][str(d)]
            cells.append(fmt(c["forget_acc"]) + (f" ({c['missing']} missed)" if c["missing"] else ""))
        mid = row["levels"][str(DROPS[1])]
        lines.append(
            f"| {row['ratio']:.2f} | {row['mask']} | "
            + " | ".join(cells)
            + f" | {fmt(mid['mia_auc'])} | "
            + ("–" if mid["step"] is None else f"{mid['step']:.1f}")
            + " |"
        )
    diffs = paired_differences(result, DROPS[1])
    if diffs:
        lines += [
            "",
            f"forget acc(mask) - forget acc(wagle) at retain -{DROPS[1]}, mean ± s.e. over seeds (> 0: wagle "
            "forgets more):",
        ]
        lines += [f"  {k}: {v['mean']:+.3f} ± {v['se']:.3f} (n={v['n']})" for k, v in diffs.items()]
    return "\n".join(lines)


def plot(result, path):
    plt = pyplot(optional=True)
    if plt is None:
        return None
    ratios = result["config"]["ratios"]
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.2), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(["dense"] + result["config"]["masks"])}
    for ax, ratio in zip(axes[0], ratios):
        for r in result["runs"]:
            if r["ratio"] in (ratio, 1.0):
                first = r["seed"] == result["config"]["seeds"][0]
                label = f"{r['mask']}" if first else None
                ax.plot(
                    r["curve"]["retain_acc"],
                    r["curve"]["forget_acc"],
                    color=colors[r["mask"]],
                    lw=1,
                    alpha=0.8,
                    label=label,
                )
        holdout = [r["curve"]["holdout_acc"][0] for r in result["runs"] if r["mask"] == "dense"]
        ax.axhline(sum(holdout) / len(holdout), color="grey", lw=0.8, ls="--", label="holdout (never trained)")
        ax.invert_xaxis()
        ax.set_xlabel("retain answer-token accuracy (falls as unlearning goes on)")
        ax.set_ylabel("forget answer-token accuracy")
        ax.set_title(f"GradDiff, mask ratio {ratio} (dense: all weights)")
        ax.legend(fontsize=8)
    fig.suptitle(f"WAGLE vs baseline masks, tiny Llama on fictitious authors, seeds {result['config']['seeds']}")
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="QUICK settings: 1 seed, ratio 0.5, wagle/magnitude/random + dense; writes nothing",
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="wagle_masks", help="file stem of the JSON and PNG written under --out")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.quick:
        result = run(
            seeds=(0,),
            ratios=(0.5,),
            masks=MAIN_MASKS,
            steps=args.steps or QUICK["steps"],
            lr=args.lr or QUICK["lr"],
            eval_every=QUICK["eval_every"],
            pretrain_steps=QUICK["pretrain_steps"],
        )
    else:
        result = run(seeds=tuple(range(args.seeds)), steps=args.steps or UNLEARN["steps"], lr=args.lr or UNLEARN["lr"])
    return finish_experiment(result, t0, format_table, plot, None if args.quick else args.out, args.name)


if __name__ == "__main__":
    main()

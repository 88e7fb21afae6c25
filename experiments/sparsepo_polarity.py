"""SparsePO sanity experiment on polarity pairs (spec llm-methods.md §1.9), small enough for a laptop CPU.

Question: when chosen and rejected answers differ only in one or two "polarity" tokens ("The cat was good."
vs "The cat was bad."), do SparsePO's masks concentrate on those tokens, and does SparsePO separate the pair
while moving the policy less on the tokens the two answers share than TDPO-1 (all masks = 1) does?

Steps, top to bottom:
1. build a few hundred polarity pairs from templates x word lists (deterministic for a seed), with some held out;
2. SFT the tiny model on *both* sides of every pair, so the reference writes sensible sentences and has
   no preference between the two polarities (the preference is then only in the pair data);
3. from that one checkpoint, with the same data and seed, train DPO, TDPO-1 (SparsePO, uniform masks),
   SparsePO with a learned common mask and SparsePO with activation (MaPO) masks;
4. on the held-out pairs measure, per variant: the mean mask at the differing tokens and elsewhere on the
   completion, their ratio, the fraction of exact zeros, the preference accuracy and margin, and the
   (unmasked) KL(ref || policy) summed over the tokens the two answers share;
5. print a table, write results.json and a plot.

    .venv/bin/python experiments/sparsepo_polarity.py               # the full run (~ minutes on 2 CPU cores)
    .venv/bin/python experiments/sparsepo_polarity.py --quick       # the test's version (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Offline and quiet before transformers / datasets are imported: everything here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ------------------------------------------------------------------------------------------------ data
# Words the tiny tokenizer (posttrain.recipes.tiny) knows as single tokens, so most pairs differ in exactly
# one token; "sad" is two tokens ("Ġs", "ad"), so the happy/sad pairs also exercise unequal lengths.
SUBJECTS = ["cat", "dog", "house", "sun", "moon", "car", "road", "bread", "apple"]
NEUTRAL = ["small", "old", "short", "slow", "cold", "hot", "green"]
POLARITY = {"good": "bad", "happy": "sad", "true": "false"}  # chosen word -> rejected word
# {P} and {Q} are polarity slots: each holds the chosen word in `chosen` and its opposite in `rejected`;
# {s}/{t} are subjects and {a} a neutral adjective, shared by both answers.
TEMPLATES = [
    ("Tell me about the {s}.", "The {s} was {P:good}."),
    ("Tell me about the {s}.", "The {s} was {P:good} and the {t} was {a}."),
    ("How was the {s}?", "The {s} was {a} and the {t} was {P:good}."),
    ("How do you feel about the {s}?", "I was {P:happy} with the {s} and the {t}."),
    ("Is the {s} {a}?", "It is {P:true} that the {s} is {a}."),
    ("Tell me about the {s} and the {t}.", "The {s} was {P:good} and the {t} was {Q:good}."),  # two flips
]


def make_pairs(n: int, seed: int) -> list[dict]:
    """``n`` distinct conversational preference rows; chosen/rejected differ only in the polarity slots."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        prompt, answer = rng.choice(TEMPLATES)
        s, t = rng.sample(SUBJECTS, 2)
        a = rng.choice(NEUTRAL)
        sides = {}
        for side in ("chosen", "rejected"):
            text = answer
            for slot in ("P", "Q"):
                for word in POLARITY:
                    text = text.replace(f"{{{slot}:{word}}}", word if side == "chosen" else POLARITY[word])
            sides[side] = text.format(s=s, t=t, a=a)
        key = (prompt.format(s=s, t=t, a=a), sides["chosen"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({
            "prompt": [{"role": "user", "content": key[0]}],
            "chosen": [{"role": "assistant", "content": sides["chosen"]}],
            "rejected": [{"role": "assistant", "content": sides["rejected"]}],
        })
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- training


def quiet_trainer(trainer, label: str, total: int):
    """Replace the Trainer's own bar and per-log printing by one tqdm bar per run (loss in the postfix)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total, desc=f"{label:>22}", leave=True, file=sys.stdout, mininterval=2.0)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    trainer.add_callback(Bar())
    return trainer


def sft_reference(pairs: list[dict], base: str, workdir: Path, steps: int, lr: float, seed: int) -> str:
    """SFT on both answers of every pair: fluent templates, no preference between the polarities."""
    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    rows = [{"messages": p["prompt"] + p[side]} for p in pairs for side in ("chosen", "rejected")]
    data = write_jsonl(rows, workdir / "sft.jsonl")
    recipe = load_recipe("sft/tiny", {
        "model_name_or_path": base, "dataset": str(data), "max_steps": steps, "learning_rate": lr,
        "per_device_train_batch_size": 16, "lr_scheduler_type": "constant", "seed": seed,
        "output_dir": str(workdir / "sft"), "logging_steps": max(1, steps // 5), "disable_tqdm": True,
    })
    trainer = quiet_trainer(build_trainer(recipe), "SFT reference", steps)
    trainer.train()
    trainer.save_model(str(workdir / "sft"))  # model + tokenizer: the starting point of every variant
    return str(workdir / "sft")


def variants(l1: float) -> dict[str, tuple[str, dict]]:
    """name -> (recipe, overrides). TDPO-1 is SparsePO with masks = 1 (its KL term stays: there is no DPO mode)."""
    sparse = {"kl_chunk_size": 256}  # a SparsePO key; DPO's recipe would reject it
    return {
        "DPO": ("dpo/tiny", {}),
        "TDPO-1": ("sparsepo/tiny", {**sparse, "mask_type": "uniform"}),
        # the L1 penalty on the learned mask (halved by the trainer for a common mask) is what pushes it to 0
        # on tokens that do not matter
        "SparsePO learned": ("sparsepo/tiny", {**sparse, "mask_type": "learned", "l1_norm_param_u": l1, "l1_norm_param_d": l1}),
        "SparsePO activation": ("sparsepo/tiny", {**sparse, "mask_type": "activation"}),
    }


def train_variant(name: str, recipe_name: str, overrides: dict, eval_every: int, eval_batches):
    """Train one variant; returns the trained trainer, its train time and a held-out trajectory."""
    from transformers import TrainerCallback

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    recipe = load_recipe(recipe_name, overrides)
    trainer = quiet_trainer(build_trainer(recipe), name, overrides["max_steps"])
    trajectory = []

    class Trajectory(TrainerCallback):  # held-out margin vs shared-token KL as training goes
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % eval_every == 0 or state.global_step == args.max_steps:
                row = evaluate(trainer, eval_batches(trainer), keep_strips=0)["metrics"]
                trajectory.append({"step": state.global_step, **{k: row[k] for k in ("margin", "accuracy", "kl_shared")}})

    trainer.add_callback(Trajectory())
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, trajectory


# ----------------------------------------------------------------------------------------- evaluation


def differing_tokens(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(2B, T) bool: completion tokens where a pair's chosen (row i) and rejected (row i+B) answers differ.

    Same length: elementwise comparison. Different lengths (e.g. "good" vs "s"+"ad"): the span between
    the common prefix and the common suffix, in each row."""
    n = input_ids.shape[0] // 2
    diff = torch.zeros_like(completion_mask, dtype=torch.bool)
    for i in range(n):
        rows = (i, i + n)
        pos = [completion_mask[r].nonzero().squeeze(-1) for r in rows]
        tok = [input_ids[r, p] for r, p in zip(rows, pos)]
        if len(tok[0]) == len(tok[1]):
            differ = tok[0] != tok[1]
            for r, p in zip(rows, pos):
                diff[r, p[differ]] = True
            continue
        shortest = min(len(tok[0]), len(tok[1]))
        prefix = 0
        while prefix < shortest and tok[0][prefix] == tok[1][prefix]:
            prefix += 1
        suffix = 0
        while suffix < shortest - prefix and tok[0][-1 - suffix] == tok[1][-1 - suffix]:
            suffix += 1
        for r, p, t in zip(rows, pos, tok):
            diff[r, p[prefix:len(t) - suffix]] = True
    return diff


@torch.no_grad()
def plain_terms(policy, ref, batch):
    """l_t and -KL(ref || policy)_t from plain full-vocabulary forwards (works for every variant, DPO too).
    Positions are in the trainer's convention: position t (of T-1) predicts token t+1."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    forward = getattr(policy, "_sparsepo_original_forward", policy)  # SparsePO patches the policy's forward
    logp = F.log_softmax(forward(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    ref_logp = F.log_softmax(ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logratio = (logp.gather(-1, labels) - ref_logp.gather(-1, labels)).squeeze(-1) * mask
    neg_kl = (ref_logp.exp() * (logp - ref_logp)).sum(-1) * mask
    return logratio, neg_kl


def evaluate(trainer, batches, keep_strips: int = 3) -> dict:
    """Held-out metrics of a trained variant (see the module docstring, step 4)."""
    beta = trainer.args.beta
    sparsepo = hasattr(trainer, "token_masks")
    sums = {k: 0.0 for k in ("m_diff", "n_diff", "m_else", "n_else", "zeros", "n_comp", "kl_shared", "kl_diff")}
    margins, objective, strips, max_gap = [], [], [], 0.0
    was_training = trainer.model.training
    trainer.model.eval()
    for raw in batches:
        batch = trainer._prepare_inputs(raw)
        mask = batch["completion_mask"][:, 1:].bool()
        diff = differing_tokens(batch["input_ids"], batch["completion_mask"])[:, 1:] & mask  # token t+1 -> position t
        shared = mask & ~diff
        logratio, neg_kl = plain_terms(trainer.model, trainer.ref_model, batch)
        if sparsepo:
            terms = trainer.token_masks(batch)
            m = terms["reward_mask"] * mask  # the common mask (learned / activation) or ones (TDPO-1)
            # the trainer's chunked path must agree with the plain forwards above
            max_gap = max(max_gap, (terms["neg_kl"] - neg_kl).abs().max().item(), (terms["logratio"] - logratio).abs().max().item())
            md = terms["kl_mask"] * mask
        else:
            m = md = mask.float()  # DPO: every completion token counts fully
        sums["m_diff"] += m[diff].sum().item()
        sums["n_diff"] += diff.sum().item()
        sums["m_else"] += m[shared].sum().item()
        sums["n_else"] += shared.sum().item()
        sums["zeros"] += ((m == 0) & mask).sum().item()
        sums["n_comp"] += mask.sum().item()
        sums["kl_shared"] += (-neg_kl * shared).sum().item()
        sums["kl_diff"] += (-neg_kl * diff).sum().item()
        # Preference margin with DPO's implicit reward beta * sum_t l_t (unmasked: comparable across variants)
        r_c, r_r = (beta * logratio.sum(-1)).chunk(2)
        margins.append(r_c - r_r)
        # The variant's own loss logit beta * (U - D) (masked; equals the above for DPO minus nothing)
        u_c, u_r = (m * logratio).sum(-1).chunk(2)
        d_c, d_r = (md * neg_kl).sum(-1).chunk(2) if sparsepo else (torch.zeros_like(u_c),) * 2
        objective.append(beta * ((u_c - u_r) - (d_c - d_r)))
        for i in range(min(keep_strips - len(strips), batch["input_ids"].shape[0] // 2)):
            where = mask[i]
            tokens = trainer.processing_class.convert_ids_to_tokens(batch["input_ids"][i, 1:][where].tolist())
            strips.append({"tokens": [t.replace("Ġ", " ") for t in tokens], "mask": m[i][where].tolist(),
                           "differs": diff[i][where].tolist()})
    trainer.model.train(was_training)
    margins, objective = torch.cat(margins), torch.cat(objective)
    pairs = len(margins)
    mask_diff = sums["m_diff"] / max(sums["n_diff"], 1)
    mask_else = sums["m_else"] / max(sums["n_else"], 1)
    metrics = {
        "mask_diff": mask_diff,
        "mask_else": mask_else,
        "ratio": mask_diff / mask_else if mask_else > 0 else float("inf"),
        "sparsity": sums["zeros"] / sums["n_comp"],
        "accuracy": (margins > 0).float().mean().item(),
        "margin": margins.mean().item(),
        "objective_margin": objective.mean().item(),
        # per sequence (chosen and rejected rows alike), summed over its tokens
        "kl_shared": sums["kl_shared"] / (2 * pairs),
        "kl_diff": sums["kl_diff"] / (2 * pairs),
        "pairs": pairs,
        "differing_tokens_per_pair": sums["n_diff"] / pairs,
    }
    if sparsepo:
        metrics["chunked_vs_plain_max_abs_diff"] = max_gap
    return {"metrics": metrics, "strips": strips}


# ------------------------------------------------------------------------------------------- reporting

COLUMNS = [("mask_diff", "mask @ differing", "{:.4g}"), ("mask_else", "mask elsewhere", "{:.4g}"),
           ("ratio", "ratio", "{:.2f}"), ("sparsity", "sparsity", "{:.2f}"), ("accuracy", "reward acc", "{:.2f}"),
           ("margin", "margin", "{:.3f}"), ("kl_shared", "shared-token KL", "{:.4f}")]


def table(results: dict) -> str:
    head = "| variant | " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for name, r in results.items():
        m = r["metrics"]
        lines.append(f"| {name} | " + " | ".join(fmt.format(m[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    strip_variants = [n for n in names if results[n]["strips"] and "SparsePO" in n]
    n_strips = sum(len(results[n]["strips"]) for n in strip_variants)
    fig = plt.figure(figsize=(11, 3.6 + 0.55 * n_strips), dpi=90)
    grid = fig.add_gridspec(2, 2, height_ratios=[3.6, 0.55 * max(n_strips, 1)], hspace=0.45)

    # (1) mask mass at the differing tokens vs elsewhere, per variant
    ax = fig.add_subplot(grid[0, 0])
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[n]["metrics"]["mask_diff"] for n in names], 0.4, label="differing tokens")
    ax.bar([i + 0.2 for i in x], [results[n]["metrics"]["mask_else"] for n in names], 0.4, label="elsewhere")
    for i, n in zip(x, names):
        ax.annotate(f"x{results[n]['metrics']['ratio']:.1f}", (i, max(results[n]["metrics"]["mask_diff"], results[n]["metrics"]["mask_else"])),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [n.replace("SparsePO ", "SparsePO\n") for n in names], fontsize=8)
    ax.set_ylabel("mean mask value (held-out)")
    ax.set_title("mask mass: differing vs shared tokens", fontsize=10)
    ax.legend(fontsize=8)

    # (2) preference margin vs KL spent on shared tokens, along training
    ax = fig.add_subplot(grid[0, 1])
    for n in names:
        traj = results[n]["trajectory"]
        ax.plot([t["kl_shared"] for t in traj], [t["margin"] for t in traj], marker=".", label=n)
    ax.set_xlabel("KL(ref || policy) summed over shared tokens, per sequence")
    ax.set_ylabel("held-out margin  beta * sum l_t")
    ax.set_title("margin vs KL on shared tokens (along training)", fontsize=10)
    ax.legend(fontsize=8)

    # (3) per-token mask strips for a few held-out chosen answers (red box = differing token)
    if n_strips:
        sub = grid[1, :].subgridspec(n_strips, 1, hspace=0.9)
        k = 0
        for n in strip_variants:
            for strip in results[n]["strips"]:
                ax = fig.add_subplot(sub[k])
                k += 1
                values = torch.tensor(strip["mask"])
                ax.imshow(values[None] / max(values.max().item(), 1e-12), cmap="viridis", aspect="auto", vmin=0, vmax=1)
                ax.set_xticks(range(len(strip["tokens"])), [repr(t)[1:-1] for t in strip["tokens"]], fontsize=7)
                for j, d in enumerate(strip["differs"]):
                    if d:
                        ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, 1, fill=False, edgecolor="red", lw=2))
                ax.set_yticks([])
                ax.set_ylabel(n.replace("SparsePO ", ""), rotation=0, ha="right", va="center", fontsize=8)
        fig.text(0.5, 0.02 + 0.0, "", ha="center")
    fig.suptitle("SparsePO on polarity pairs (held-out); strips: mask per completion token / row max, red = differing token",
                 fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="preference-training steps per variant")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps for the reference model")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data, the SFT run and every variant")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the preference runs")
    parser.add_argument("--l1", type=float, default=None, help="l1_norm_param_u = l1_norm_param_d for the learned mask")
    parser.add_argument("--model", default="tiny:qwen3", help="starting model (a tiny:<arch> or a local folder)")
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (plus 64 held out)")
    parser.add_argument("--out", default="experiments/results", help="folder for results.json and the plot")
    parser.add_argument("--quick", action="store_true", help="a < 1 minute version for the test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain little from more)")
    args = parser.parse_args(argv)
    defaults = dict(steps=60, sft_steps=60, pairs=192, lr=1e-3, l1=1e-3) if args.quick else \
        dict(steps=200, sft_steps=150, pairs=320, lr=1e-3, l1=1e-3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.logging.set_verbosity_error()

    held_out = 64
    started = time.perf_counter()
    pairs = make_pairs(args.pairs + held_out, args.seed)
    with tempfile.TemporaryDirectory(prefix="sparsepo-polarity-") as tmp:
        workdir = Path(tmp)
        data = write_jsonl(pairs, workdir / "pairs.jsonl")
        t0 = time.perf_counter()
        reference = sft_reference(pairs[: args.pairs], args.model, workdir, args.sft_steps, 1e-3, args.seed)
        sft_seconds = time.perf_counter() - t0
        common = {
            "model_name_or_path": reference, "dataset": str(data),
            "dataset_split": f"train[:{args.pairs}]", "eval_split": f"train[{args.pairs}:]",  # last 64 held out
            "max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler_type": "constant", "beta": 0.1,
            "per_device_train_batch_size": 8, "max_length": 64, "seed": args.seed,
            "logging_steps": max(1, args.steps // 10), "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True,
        }

        def eval_batches(trainer):
            return list(trainer.get_eval_dataloader())

        results = {}
        for name, (recipe_name, overrides) in variants(args.l1).items():
            overrides = {**common, **overrides, "output_dir": str(workdir / name.replace(" ", "_"))}
            trainer, seconds, trajectory = train_variant(name, recipe_name, overrides, max(1, args.steps // 10), eval_batches)
            result = evaluate(trainer, eval_batches(trainer))
            logs = [e for e in trainer.state.log_history if "loss" in e]
            result.update(train_seconds=seconds, trajectory=trajectory, final_train_log=logs[-1] if logs else {})
            results[name] = result
            m = result["metrics"]
            print(f"{name}: {seconds:.0f} s; held-out ratio {m['ratio']:.2f}, acc {m['accuracy']:.2f}, "
                  f"margin {m['margin']:.3f}, shared KL {m['kl_shared']:.4f}", flush=True)
    total = time.perf_counter() - started

    print()
    print(table(results))
    learned = results["SparsePO learned"]["metrics"]["ratio"]
    print(f"\nacceptance (learned mask puts >= 3x more mass on differing tokens): ratio {learned:.2f} -> "
          f"{'PASS' if learned >= 3 else 'FAIL'}")
    print(f"total {total:.0f} s (SFT {sft_seconds:.0f} s)")
    payload = {
        "config": {**vars(args), "held_out_pairs": held_out, "beta": 0.1, "batch_size": 8, "torch": torch.__version__,
                   "machine": f"{os.cpu_count()}-core CPU"},
        "sft_seconds": sft_seconds, "total_seconds": total,
        "acceptance": {"criterion": "learned-mask ratio >= 3", "ratio": learned, "passed": learned >= 3},
        "variants": results,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(results, out / "sparsepo_polarity.png")
    print(f"wrote {out / 'results.json'} and {out / 'sparsepo_polarity.png'}")
    return payload


if __name__ == "__main__":
    main()

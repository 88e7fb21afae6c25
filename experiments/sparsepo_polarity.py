"""SparsePO sanity experiment on polarity pairs (arXiv 2410.05102 in miniature), small enough for a 2-core CPU.

Question: when the chosen and rejected answers differ only in one or two "polarity" tokens ("The cat was
good." vs "The cat was bad."), do SparsePO's token masks concentrate on those tokens, and does SparsePO
separate the pair while moving the policy less on the tokens both answers share than TDPO-1 (masks = 1)?

Steps, top to bottom:
1. build a few hundred polarity pairs from templates x word lists (deterministic for a seed); hold out 64;
2. SFT a small randomly initialised model on *both* answers of every training pair, so the reference
   writes the templates fluently and has no preference between the polarities (the preference is then
   only in the pair data);
3. from that one checkpoint, with the same data, seed and schedule, train DPO, TDPO-1 (SparsePO with
   uniform masks), SparsePO with a learned common mask, and SparsePO with activation (MaPO) masks;
4. on the held-out pairs measure per variant: the mean mask at the differing tokens and elsewhere on the
   completion and their ratio, the fraction of exact zeros, the preference accuracy and margin, and the
   unmasked KL(ref || policy) summed over the tokens both answers share (also along training, to compare
   KL at equal margin);
5. print a table, write sparsepo_polarity.json and sparsepo_polarity.png (in --out).

    .venv/bin/python experiments/sparsepo_polarity.py            # the full run (~3 minutes on a 2-core CPU)
    .venv/bin/python experiments/sparsepo_polarity.py --quick    # the test's version (< 1 minute)

Conventions of the trainer (trainers/sparsepo.py): masks, log-ratios and -KL are (2B, T-1) tensors with
rows [chosen; rejected]; position t holds the prediction of token t+1. So "the mask at a differing token"
is the mask at the position *before* it: a value computed from the reference's hidden state of the
shared prefix, the same in both rows of the pair.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot

# Offline and quiet before transformers / datasets are imported: everything here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HELD_OUT = 64
BETA = 0.1

# ------------------------------------------------------------------------------------------------ data
# Words the tiny tokenizer (posttrain.recipes.tiny) has as single tokens, so most pairs differ in exactly one
# token; "sad" is two tokens ("Ġs", "ad"), so the happy/sad pairs also exercise answers of unequal length.
SUBJECTS = ["cat", "dog", "house", "sun", "moon", "car", "road", "bread", "apple"]
NEUTRAL = ["small", "old", "short", "slow", "cold", "hot", "green"]
POLARITY = {"good": "bad", "happy": "sad", "true": "false"}  # chosen word -> rejected word
# {P:w} and {Q:w} are polarity slots: the chosen answer has w, the rejected one POLARITY[w]. {s}/{t} are
# subjects and {a} a neutral adjective, the same in both answers (the template with Q flips two tokens).
TEMPLATES = [
    ("Tell me about the {s}.", "The {a} {s} was {P:good}."),
    ("Tell me about the {s}.", "The {s} was {P:good} and the {t} was {a}."),
    ("How was the {s}?", "The {s} was {a} and the {t} was {P:good}."),
    ("How do you feel about the {s}?", "I was {P:happy} with the {s} and the {t}."),
    ("Is the {s} {a}?", "It is {P:true} that the {s} is {a}."),
    ("Tell me about the {s} and the {t}.", "The {s} was {P:good} and the {t} was {Q:good}."),
]


def make_pairs(n: int, seed: int) -> list[dict]:
    """``n`` distinct conversational preference rows whose answers differ only in the polarity slots."""
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
                for word, opposite in POLARITY.items():
                    text = text.replace(f"{{{slot}:{word}}}", word if side == "chosen" else opposite)
            sides[side] = text.format(s=s, t=t, a=a)
        key = (prompt.format(s=s, t=t, a=a), sides["chosen"])
        if key in seen:  # distinct rows, so held-out pairs never repeat a training pair
            continue
        seen.add(key)
        rows.append(
            {
                "prompt": [{"role": "user", "content": key[0]}],
                "chosen": [{"role": "assistant", "content": sides["chosen"]}],
                "rejected": [{"role": "assistant", "content": sides["rejected"]}],
            }
        )
    # Templates with few combinations run out of new rows first, so late rows over-represent the others:
    # shuffle, so that the held-out tail is a random sample of all templates.
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- models


def build_small_model(path: Path, seed: int) -> str:
    """The default starting model: 4 layers, hidden 128 (twice ``tiny:qwen3`` in depth and width, ~1M
    parameters), Qwen3-shaped, around the tiny tokenizer; randomly initialised with ``seed``.

    Why not tiny:qwen3: on the 2-layer, hidden-64 model the learned mask (initialised at ~1e-3) grows so
    slowly at lr 1e-4 that after a few hundred steps it is still ~0.01-0.1 and its pattern depends a lot
    on the seed (see EXPERIMENTS.md); a wider input gives the mask readout a larger step per update."""
    from transformers import Qwen3Config

    from posttrain.recipes.tiny import TOKENIZER_IDS, build_tokenizer, init_model

    config = Qwen3Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **TOKENIZER_IDS,
    )
    model = init_model(config, seed)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------- training


def quiet_trainer(trainer, label: str, total: int):
    """One tqdm bar per run (loss in the postfix) instead of the Trainer's bar and printed log dicts."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total, desc=f"{label:>20}", file=sys.stdout, mininterval=2.0, ncols=90)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    trainer.add_callback(Bar())
    return trainer


def sft_reference(pairs: list[dict], base: str, workdir: Path, steps: int, seed: int) -> tuple[str, float]:
    """SFT on both answers of every pair; returns the checkpoint folder and the final training loss."""
    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    rows = [{"messages": p["prompt"] + p[side]} for p in pairs for side in ("chosen", "rejected")]
    data = write_jsonl(rows, workdir / "sft.jsonl")
    recipe = load_recipe(
        "sft/tiny",
        {
            "model_name_or_path": base,
            "dataset": str(data),
            "max_steps": steps,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,
            "seed": seed,
            "output_dir": str(workdir / "sft"),
            "logging_steps": max(1, steps // 5),
            "disable_tqdm": True,
        },
    )
    trainer = quiet_trainer(build_trainer(recipe), "SFT reference", steps)
    trainer.train()
    trainer.save_model(str(workdir / "sft"))  # model + tokenizer: the starting point of every variant
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return str(workdir / "sft"), losses[-1]


def variants(l1: float) -> dict[str, tuple[str, dict]]:
    """name -> (recipe, overrides). TDPO-1 is SparsePO with masks = 1 (the KL term stays: there is no DPO mode)."""
    sparse = {"kl_chunk_size": 256}  # a SparsePO-only key; DPO's recipe would reject it
    return {
        "DPO": ("dpo/tiny", {}),
        "TDPO-1": ("sparsepo/tiny", {**sparse, "mask_type": "uniform"}),
        # The L1 penalty (halved by the trainer for a common mask) is what drives the learned mask to exactly 0
        # on tokens that do not help separate the pair; without it nothing pulls those values down.
        "SparsePO learned": (
            "sparsepo/tiny",
            {**sparse, "mask_type": "learned", "l1_norm_param_u": l1, "l1_norm_param_d": l1},
        ),
        "SparsePO activation": ("sparsepo/tiny", {**sparse, "mask_type": "activation"}),
    }


def train_variant(name: str, recipe_name: str, overrides: dict, eval_every: int):
    """Train one variant; returns the trained trainer, its wall time (with the trajectory evaluations), a
    held-out trajectory (margin, accuracy, shared-token KL at step 0 and every ``eval_every`` steps), the
    held-out metrics at initialisation (masks included) and the collated held-out batches."""
    from transformers import TrainerCallback

    from posttrain.recipes.config import load_recipe
    from posttrain.recipes.train import build_trainer

    trainer = quiet_trainer(build_trainer(load_recipe(recipe_name, overrides)), name, overrides["max_steps"])
    held_out = list(trainer.get_eval_dataloader())  # collated once, reused at every evaluation
    trajectory, initial = [], {}

    def record(step, with_masks=False):  # margin and KL; the masks only at step 0 (and after training)
        m = evaluate(trainer, held_out, keep_strips=0, with_masks=with_masks)["metrics"]
        trajectory.append({"step": step, **{k: m[k] for k in ("margin", "accuracy", "kl_shared")}})
        return m

    class Trajectory(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            initial.update(record(0, with_masks=True))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % eval_every == 0 or state.global_step == args.max_steps:
                record(state.global_step)

    trainer.add_callback(Trajectory())
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, trajectory, initial, held_out


# ----------------------------------------------------------------------------------------- evaluation


def differing_tokens(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(2B, T) bool: the completion tokens where a pair's chosen (row i) and rejected (row i+B) answers differ.

    Equal lengths: elementwise comparison (two flipped slots stay two separate tokens). Unequal lengths
    (e.g. "Ġgood" vs "Ġs" "ad"): the whole span between the common prefix and the common suffix, in each row."""
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
            diff[r, p[prefix : len(t) - suffix]] = True
    return diff


@torch.no_grad()
def plain_terms(policy, ref, batch):
    """l_t and -KL(ref || policy)_t from plain full-vocabulary forwards, for every variant (DPO has no
    token_masks). For SparsePO variants they are checked against the trainer's chunked path."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    forward = getattr(policy, "_sparsepo_original_forward", policy)  # SparsePO patches the policy's forward
    logp = F.log_softmax(forward(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    ref_logp = F.log_softmax(ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logratio = (logp.gather(-1, labels) - ref_logp.gather(-1, labels)).squeeze(-1) * mask
    neg_kl = (ref_logp.exp() * (logp - ref_logp)).sum(-1) * mask
    return logratio, neg_kl


def evaluate(trainer, batches, keep_strips: int = 4, with_masks: bool = True) -> dict:
    """Held-out metrics of one variant (module docstring, step 4), plus per-token mask strips for the plot.
    ``with_masks=False``: only the margins and KLs (cheaper: for the trajectory during training)."""
    sparsepo = with_masks and hasattr(trainer, "token_masks")
    total = defaultdict(float)
    by_token = defaultdict(lambda: [0.0, 0.0, 0])  # predicted token -> [mask sum, KL sum, count]
    neutral_ids = set(trainer.processing_class.convert_tokens_to_ids([f"Ġ{w}" for w in NEUTRAL]))
    margins, objective, strips, gap = [], [], [], 0.0
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
            m, md = terms["reward_mask"] * mask, terms["kl_mask"] * mask  # the same tensor for a common mask
            gap = max(
                gap, (terms["neg_kl"] - neg_kl).abs().max().item(), (terms["logratio"] - logratio).abs().max().item()
            )
        else:
            m = md = mask.float()  # DPO: every completion token counts fully
        # "elsewhere" = shared tokens, also split in two: the neutral-adjective slots (adjective slots like the
        # polarity one, but the same word in both answers) and all the other shared tokens
        slot = shared & torch.isin(batch["input_ids"][:, 1:], torch.tensor(sorted(neutral_ids)))
        for key, where in (("diff", diff), ("else", shared), ("slot", slot), ("comp", mask)):
            total[f"m_{key}"] += m[where].sum().item()
            total[f"n_{key}"] += where.sum().item()
        total["zeros"] += ((m == 0) & mask).sum().item()
        total["zeros_shared"] += ((m == 0) & shared).sum().item()
        total["min"] = min(total.get("min", float("inf")), m[mask].min().item())
        total["max"] = max(total.get("max", -float("inf")), m[mask].max().item())
        total["kl_shared"] += (-neg_kl * shared).sum().item()
        total["kl_shared_chosen"] += (-neg_kl * shared).chunk(2)[0].sum().item()  # the rest is the rejected rows
        total["kl_diff"] += (-neg_kl * diff).sum().item()
        # Margin with DPO's implicit reward beta * sum_t l_t, unmasked, so it means the same for every variant.
        r_c, r_r = (BETA * logratio.sum(-1)).chunk(2)
        margins.append(r_c - r_r)
        # The variant's own loss logit beta * (U - D) (``sparsepo_loss``), masked; for DPO the same as above.
        u_c, u_r = (m * logratio).sum(-1).chunk(2)
        d_c, d_r = (md * neg_kl).sum(-1).chunk(2) if sparsepo else (torch.zeros_like(u_c),) * 2
        objective.append(BETA * ((u_c - u_r) - (d_c - d_r)))
        if not with_masks:
            continue
        names = trainer.processing_class.convert_ids_to_tokens(batch["input_ids"][:, 1:][mask].tolist())
        for name, value, kl in zip(names, m[mask].tolist(), (-neg_kl)[mask].tolist()):  # by the token predicted
            entry = by_token[name.replace("Ġ", " ")]
            entry[0], entry[1], entry[2] = entry[0] + value, entry[1] + kl, entry[2] + 1
        for i in range(batch["input_ids"].shape[0] // 2):
            where = mask[i]
            kind = trainer.processing_class.decode(batch["input_ids"][i, 1:][diff[i]])
            if len(strips) >= keep_strips or kind in {s["differing"] for s in strips}:
                continue  # one strip per polarity word, for variety
            tokens = trainer.processing_class.convert_ids_to_tokens(batch["input_ids"][i, 1:][where].tolist())
            strips.append(
                {
                    "differing": kind,
                    "tokens": [t.replace("Ġ", " ") for t in tokens],
                    "mask": m[i][where].tolist(),
                    "differs": diff[i][where].tolist(),
                }
            )
    trainer.model.train(was_training)
    margins, objective = torch.cat(margins), torch.cat(objective)
    pairs = len(margins)
    mask_diff = total["m_diff"] / max(total["n_diff"], 1)
    mask_else = total["m_else"] / max(total["n_else"], 1)
    metrics = {
        "mask_diff": mask_diff,
        "mask_else": mask_else,
        "ratio": mask_diff / mask_else if mask_else > 0 else (float("inf") if mask_diff > 0 else float("nan")),
        "mask_min": total["min"],
        "mask_max": total["max"],
        "mask_neutral_slot": total["m_slot"] / max(total["n_slot"], 1),
        "mask_other_shared": (total["m_else"] - total["m_slot"]) / max(total["n_else"] - total["n_slot"], 1),
        "sparsity": total["zeros"] / total["n_comp"],
        "sparsity_shared": total["zeros_shared"] / max(total["n_else"], 1),
        "accuracy": (margins > 0).float().mean().item(),
        "margin": margins.mean().item(),
        "objective_margin": objective.mean().item(),
        # per sequence (chosen and rejected rows alike), summed over its shared / differing tokens
        "kl_shared": total["kl_shared"] / (2 * pairs),
        "kl_diff": total["kl_diff"] / (2 * pairs),
        # TDPO-1's loss logit contains +KL(chosen) - KL(rejected), so chosen and rejected rows are told apart
        "kl_shared_chosen": total["kl_shared_chosen"] / pairs,
        "kl_shared_rejected": (total["kl_shared"] - total["kl_shared_chosen"]) / pairs,
        "pairs": pairs,
        "differing_tokens_per_pair": total["n_diff"] / pairs,
    }
    if sparsepo:
        metrics["chunked_vs_plain_max_abs_diff"] = gap
    # mean mask and KL at the positions predicting each (frequent) token, highest mask first
    frequent = sorted(((v[0] / v[2], v[1] / v[2], v[2], t) for t, v in by_token.items() if v[2] >= 8), reverse=True)
    by_next_token = {t: {"mask": round(mm, 4), "kl": round(kl, 3), "count": n} for mm, kl, n, t in frequent}
    return {"metrics": metrics, "strips": strips, "by_next_token": by_next_token}


def kl_at_margin(trajectory: list[dict], target: float) -> float | None:
    """Shared-token KL where the held-out margin first reaches ``target`` (linear interpolation), else None."""
    for before, after in zip(trajectory, trajectory[1:]):
        if before["margin"] < target <= after["margin"]:
            w = (target - before["margin"]) / (after["margin"] - before["margin"])
            return before["kl_shared"] + w * (after["kl_shared"] - before["kl_shared"])
    return None


# ------------------------------------------------------------------------------------------- reporting

COLUMNS = [
    ("mask_diff", "mask @ differing", "{:.3g}"),
    ("mask_else", "mask elsewhere", "{:.3g}"),
    ("ratio", "ratio", "{:.2f}"),
    ("sparsity", "sparsity", "{:.2f}"),
    ("accuracy", "reward acc", "{:.2f}"),
    ("margin", "margin", "{:.2f}"),
    ("kl_shared", "shared-token KL", "{:.2f}"),
    ("kl_at_target", "shared KL @ margin {target:.2f}", "{:.2f}"),
]


def table(results: dict, target: float) -> str:
    lines = [
        "| variant | " + " | ".join(c[1].format(target=target) for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, r in results.items():
        cells = [("n/a" if r["metrics"].get(key) is None else fmt.format(r["metrics"][key])) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, target: float, path: Path) -> None:
    plt = pyplot()

    names = list(results)
    strip_rows = [(n, s) for n in names if "SparsePO" in n for s in results[n]["strips"]]
    fig = plt.figure(figsize=(11, 4.2 + 0.62 * len(strip_rows)), dpi=80)
    grid = fig.add_gridspec(2, 2, height_ratios=[4.2, 0.62 * max(len(strip_rows), 1)], hspace=0.5, wspace=0.3)

    # (1) mean mask at the differing tokens vs elsewhere, per variant (log scale: the learned mask is small)
    ax = fig.add_subplot(grid[0, 0])
    x = list(range(len(names)))
    bars = [
        ("mask_diff", "differing (polarity) tokens"),
        ("mask_else", "elsewhere = all shared tokens"),
        ("mask_neutral_slot", "  of which: neutral-adjective slots"),
        ("mask_other_shared", "  of which: the rest"),
    ]
    for k, (key, label) in enumerate(bars):
        ax.bar(
            [i + 0.2 * (k - 1.5) for i in x], [max(results[n]["metrics"][key], 1e-4) for n in names], 0.2, label=label
        )
    for i, n in zip(x, names):
        ax.annotate(f"x{results[n]['metrics']['ratio']:.1f}", (i, 1.4), ha="center", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(1e-3, 3)
    ax.set_xticks(x, [n.replace("SparsePO ", "SparsePO\n") for n in names], fontsize=8)
    ax.set_ylabel("mean mask on held-out completions")
    ax.set_title("mean mask by token kind (ratio differing / elsewhere on top)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")

    # (2) held-out margin vs KL spent on the shared tokens, along training
    ax = fig.add_subplot(grid[0, 1])
    for n in names:
        traj = results[n]["trajectory"]
        ax.plot([t["kl_shared"] for t in traj], [t["margin"] for t in traj], marker=".", label=n)
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KL(ref || policy) summed over shared tokens (per sequence)")
    ax.set_ylabel("held-out margin  beta * (sum l(y_w) - sum l(y_l))")
    ax.set_title("margin vs shared-token KL along training", fontsize=10)
    ax.legend(fontsize=8)

    # (3) the mask per completion token for a few held-out chosen answers (red box = differing token)
    if strip_rows:
        sub = grid[1, :].subgridspec(len(strip_rows), 1, hspace=1.3)
        for k, (name, strip) in enumerate(strip_rows):
            ax = fig.add_subplot(sub[k])
            values = torch.tensor(strip["mask"])
            ax.imshow(values[None] / max(values.max().item(), 1e-12), cmap="viridis", aspect="auto", vmin=0, vmax=1)
            ax.set_xticks(range(len(strip["tokens"])), [repr(t)[1:-1] for t in strip["tokens"]], fontsize=7)
            for j, differs in enumerate(strip["differs"]):
                if differs:
                    ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, 1, fill=False, edgecolor="red", lw=2))
            ax.set_yticks([])
            ax.set_ylabel(name.replace("SparsePO ", ""), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(
        "SparsePO on polarity pairs, held-out. Strips: mask for each completion token (scaled to the "
        "row max), red = differing token",
        fontsize=9,
    )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="preference-training steps per variant (300; quick 60)")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps for the reference (150; quick 60)")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the data, the model, the SFT run and every variant"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate of the preference runs (1e-4; quick 5e-4)"
    )
    parser.add_argument(
        "--l1", type=float, default=None, help="l1_norm_param_u = l1_norm_param_d, learned mask (1e-2; quick 3e-2)"
    )
    parser.add_argument(
        "--model", default="small", help="'small' (built here), tiny:<arch> or a local checkpoint folder"
    )
    parser.add_argument(
        "--pairs", type=int, default=None, help=f"training pairs, plus {HELD_OUT} held out (320; quick 128)"
    )
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(variants(0)))
    parser.add_argument("--points", type=int, default=None, help="held-out evaluations along each run (15; quick 4)")
    parser.add_argument("--out", default="experiments/results", help="folder for sparsepo_polarity.json and .png")
    parser.add_argument(
        "--quick", action="store_true", help="the < 1 minute version the test runs (no DPO, fewer steps)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these models gain little from more)")
    args = parser.parse_args(argv)
    # quick: fewer, larger steps; a stronger L1 makes the short run's mask contrast less seed-dependent
    quick = dict(
        steps=60,
        sft_steps=60,
        pairs=128,
        lr=5e-4,
        l1=3e-2,
        points=4,
        variants="TDPO-1,SparsePO learned,SparsePO activation",
    )
    full = dict(steps=300, sft_steps=150, pairs=320, lr=1e-4, l1=1e-2, points=15, variants=",".join(variants(0)))
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = set(chosen) - set(variants(0))
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(variants(0))}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    started = time.perf_counter()
    pairs = make_pairs(args.pairs + HELD_OUT, args.seed)  # the last HELD_OUT rows are held out
    with tempfile.TemporaryDirectory(prefix="sparsepo-polarity-") as tmp:
        workdir = Path(tmp)
        data = write_jsonl(pairs, workdir / "pairs.jsonl")
        base = build_small_model(workdir / "base", args.seed) if args.model == "small" else args.model
        t0 = time.perf_counter()
        reference, sft_loss = sft_reference(pairs[: args.pairs], base, workdir, args.sft_steps, args.seed)
        sft_seconds = time.perf_counter() - t0
        common = {
            "model_name_or_path": reference,
            "dataset": str(data),
            "dataset_split": f"train[:{args.pairs}]",
            "eval_split": f"train[{args.pairs}:]",
            "max_steps": args.steps,
            "learning_rate": args.lr,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "beta": BETA,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": HELD_OUT,
            "max_length": 64,
            "seed": args.seed,
            "logging_steps": max(1, args.steps // 10),
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        }
        results = {}
        for name, (recipe_name, overrides) in variants(args.l1).items():
            if name not in chosen:
                continue
            overrides = {**common, **overrides, "output_dir": str(workdir / name.replace(" ", "_"))}
            trainer, seconds, trajectory, initial, held_out = train_variant(
                name, recipe_name, overrides, max(1, args.steps // args.points)
            )
            result = evaluate(trainer, held_out)
            logs = [e for e in trainer.state.log_history if "loss" in e]
            result.update(
                seconds=seconds,
                initial={k: initial[k] for k in ("mask_diff", "mask_else", "ratio", "sparsity")},
                trajectory=trajectory,
                last_train_log=logs[-1] if logs else {},
            )
            if result["metrics"]["mask_max"] == 0:
                print(
                    f"{name}: the mask is exactly 0 on every held-out token (ReLU mask dead): this run learned nothing"
                )
            results[name] = result
            m = result["metrics"]
            print(
                f"{name}: {seconds:.0f} s; held-out mask ratio {m['ratio']:.2f}, sparsity {m['sparsity']:.2f}, "
                f"acc {m['accuracy']:.2f}, margin {m['margin']:.2f}, shared-token KL {m['kl_shared']:.2f}",
                flush=True,
            )
            del trainer
    total = time.perf_counter() - started

    # KL at equal margin: 0.8 x the largest margin that every variant reached (so every curve crosses it);
    # a run that barely moved (a dead learned mask: margin < 1) is left out of the choice
    reached = [max(t["margin"] for t in r["trajectory"]) for r in results.values()]
    target = 0.8 * min([m for m in reached if m >= 1.0] or [max(reached)])
    for r in results.values():
        r["metrics"]["kl_at_target"] = kl_at_margin(r["trajectory"], target)

    print()
    print(table(results, target))
    learned = results.get("SparsePO learned", {}).get("metrics", {}).get("ratio")
    if learned is not None:
        print(
            f"\nacceptance (learned masks put >= 3x more mass on differing tokens than elsewhere): "
            f"ratio {learned:.2f} -> {'PASS' if learned >= 3 else 'FAIL'}"
        )
    print(
        f"total {total:.0f} s (SFT {sft_seconds:.0f} s) on {os.cpu_count()} CPU cores, {args.threads} torch thread(s)"
    )
    payload = {
        "config": {
            **vars(args),
            "held_out_pairs": HELD_OUT,
            "beta": BETA,
            "batch_size": 8,
            "sft_lr": 1e-3,
            "torch": torch.__version__,
            "cpu_cores": os.cpu_count(),
        },
        "sft_final_loss": sft_loss,
        "sft_seconds": sft_seconds,
        "total_seconds": total,
        "equal_margin_target": target,
        "acceptance": None
        if learned is None
        else {"criterion": "learned-mask ratio (differing / elsewhere) >= 3", "ratio": learned, "passed": learned >= 3},
        "variants": results,
    }
    write_json_atomic(out / "sparsepo_polarity.json", payload, indent=1)
    plot(results, target, out / "sparsepo_polarity.png")
    print(f"wrote {out / 'sparsepo_polarity.json'} and {out / 'sparsepo_polarity.png'}")
    return payload


if __name__ == "__main__":
    main()

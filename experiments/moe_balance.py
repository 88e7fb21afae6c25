"""ALF-LB sanity experiment: a tiny DeepSeek-V3-style MoE LM trained from scratch on CPU (arXiv 2408.15664 in small).

Question: with the same model, data, seed and schedule, how do no balancing, the auxiliary balance loss
(alpha = 1e-3) and aux-loss-free balancing (sign rule, u in {1e-4, 1e-3, 1e-2}) compare in expert-load balance
(MaxVio) and language-model loss? Claim under test (the acceptance bar set for this implementation, after the
paper's aux-loss vs loss-free comparison): aux-free with u = 1e-3 reaches a MaxVio at least 5x lower than no
balancing and lower than the aux loss, at a held-out LM loss no more than 2% above the aux loss's.

Setting:
* text: the docstrings of Python's own standard library (``ast`` over the sorted ``*.py`` files of
  ``sysconfig.get_paths()["stdlib"]``), real English/technical prose with Zipfian token statistics, nothing
  downloaded; a byte-level BPE (vocab 1024) trained on it; the token stream is cut into 64-token sequences,
  the last 10% held out. The corpus depends on the Python version (3.11 here), so it is deterministic per
  interpreter.
* model: ``DeepseekV3ForCausalLM`` from a local config, random init: d = 64, 2 layers, every layer MoE with
  8 routed experts (top-2, sigmoid affinities, no group limit: n_group = topk_group = 1), 1 shared expert,
  expert width 32, routed_scaling_factor 1. The router's ``e_score_correction_bias`` is the aux-free bias.
* training: AdamW lr 2e-3 (linear warm-up 20 steps, then constant), batch 16 x 64 tokens, 400 steps
  (``--quick``: 25 steps), one CPU thread, 3 seeds (``--seeds``). Within a seed every variant starts from the
  same initial weights and sees the same batches; the table gives means over seeds, the verdict also counts
  the seeds in which each check holds.
* no balancing: plain LM loss, bias fixed at 0. aux loss: LM loss + ``aux_balance_loss`` (alpha 1e-3,
  f_i P_i with P from the normalised sigmoid affinities) per layer, summed over layers (as
  ``output_router_logits`` gives the router logits, the selection is recomputed with ``biased_topk``; DeepSeek-V3
  in transformers has no aux loss of its own). aux-free: plain LM loss + ``MoEBalanceCallback``
  (sign rule) driven like a Trainer would (on_step_begin / on_step_end).
* metrics: MaxVio_batch per step (mean over layers of the training batch's loads, counted by
  ``RoutingCounter`` before the update); the table reports its mean over the last 25% of steps, and, after
  training, MaxVio_global (loads over the whole held-out set, mean over layers) and the held-out LM loss.

    .venv/bin/python experiments/moe_balance.py            # the full run (~5 minutes on 1 thread)
    .venv/bin/python experiments/moe_balance.py --quick    # 25 steps, 1 seed, writes nothing (~20 s)
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from posttrain.atomic import write_json_atomic
from posttrain.plots import pyplot, save_figure
from posttrain.trainers.moe_aux_loss import aux_balance_loss
from posttrain.trainers.moe_balance import MoEBalanceCallback, MoEBalanceConfig, biased_topk, max_violation
from posttrain.trainers.moe_routers import RoutingCounter, find_routers

SEQ = 64
BATCH = 16
VOCAB = 1024
N_EXPERTS, TOP_K = 8, 2
AUX_ALPHA = 1e-3
RATES = (1e-4, 1e-3, 1e-2)
WARMUP = 20
LR = 2e-3
MAX_CHARS = 1_500_000


# ------------------------------------------------------------------------------------------------ data


def stdlib_docstrings(max_chars=MAX_CHARS) -> str:
    """Docstrings of the standard library's modules, classes and functions, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(p in skip for p in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip())
                    total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def build_data(max_chars=MAX_CHARS):
    """(train (N, SEQ), held-out (M, SEQ)) token ids of the docstring corpus, BPE vocab VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = stdlib_docstrings(max_chars)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.split("\n\n"),
        trainers.BpeTrainer(
            vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    n = ids.numel() // SEQ
    seqs = ids[: n * SEQ].view(n, SEQ)
    cut = int(n * 0.9)
    return seqs[:cut], seqs[cut:], len(text)


# ------------------------------------------------------------------------------------------------ model


def make_model(seed=0):
    """``tiny:deepseek_v3`` with this experiment's vocabulary, expert count, top-k, one group and no special ids."""
    from posttrain.recipes.tiny import init_model, tiny_config

    config = tiny_config(
        "deepseek_v3",
        vocab_size=VOCAB,
        n_routed_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        n_group=1,
        norm_topk_prob=True,
        max_position_embeddings=SEQ,
        pad_token_id=None,
        eos_token_id=None,
    )
    return init_model(config, seed)


def aux_loss_of(model, router_logits):
    """Sum over MoE layers of aux_balance_loss on the layer's sigmoid affinities and its (biased) selection."""
    total = 0.0
    for logits, (_, router) in zip(router_logits, find_routers(model)):
        scores = logits.sigmoid()
        idx, _ = biased_topk(scores, router.e_score_correction_bias, TOP_K)
        total = total + aux_balance_loss(scores, idx, N_EXPERTS, alpha=AUX_ALPHA)
    return total


@torch.no_grad()
def evaluate(model, held_out):
    """Held-out LM loss (token mean) and MaxVio_global (loads over the whole held-out set, mean over layers)."""
    model.eval()
    counter = RoutingCounter(model, ignore_padding=False)
    losses = []
    for i in range(0, len(held_out), 32):
        ids = held_out[i : i + 32]
        losses.append(model(input_ids=ids, labels=ids).loss.item() * len(ids))
    loads = counter.stacked()
    counter.remove()
    model.train()
    return sum(losses) / len(held_out), max_violation(loads), loads.tolist()


def train_run(name, mode, rate, init_state, train, held_out, steps, seed=0):
    from transformers import TrainerControl, TrainerState

    model = make_model(seed)
    model.load_state_dict(init_state)
    model.train()
    cfg = MoEBalanceConfig(moe_balance=mode, moe_bias_rate=rate, moe_log_per_layer=False)
    cb = MoEBalanceCallback(cfg, model=model)  # loads + metrics in every mode; bias updates only in aux_free
    state, control = TrainerState(), TrainerControl()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    curve = {"maxvio": [], "loss": [], "aux": [], "bias_norm": []}
    t0 = time.time()
    for step in range(steps):
        j = (step * BATCH) % (len(order) - BATCH)
        ids = train[order[j : j + BATCH]]
        cb.on_step_begin(None, state, control)
        out = model(input_ids=ids, labels=ids, output_router_logits=(mode == "aux_loss"))
        loss = out.loss
        aux = aux_loss_of(model, out.router_logits) if mode == "aux_loss" else torch.zeros(())
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.global_step += 1
        cb.on_step_end(None, state, control)
        m = cb.last_metrics
        curve["maxvio"].append(m["moe/maxvio"])
        curve["loss"].append(loss.item())
        curve["aux"].append(float(aux.detach()))
        curve["bias_norm"].append(m["moe/bias_norm"])
    eval_loss, maxvio_global, loads = evaluate(model, held_out)
    cb.on_train_end(None, state, control)
    tail = max(1, steps // 4)
    return {
        "name": name,
        "mode": mode,
        "rate": rate,
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "maxvio_batch_first": sum(curve["maxvio"][:tail]) / tail,
        "maxvio_batch_last": sum(curve["maxvio"][-tail:]) / tail,
        "maxvio_global": maxvio_global,
        "eval_loss": eval_loss,
        "train_loss_last": sum(curve["loss"][-tail:]) / tail,
        "bias_norm": curve["bias_norm"][-1],
        "eval_loads": loads,
        "curve": {k: [round(v, 5) for v in vals] for k, vals in curve.items()},
    }


def variants():
    out = [("none", "none", 0.0), ("aux_loss a=1e-3", "aux_loss", 0.0)]
    out += [(f"aux_free u={u:g}", "aux_free", u) for u in RATES]
    return out


SUMMARY_KEYS = ("maxvio_batch_first", "maxvio_batch_last", "maxvio_global", "eval_loss", "bias_norm", "seconds")


def summarise(runs):
    """Per variant: the mean over seeds of each summary number, plus the per-seed values."""
    out = {}
    for name, _, _ in variants():
        rs = [r for r in runs if r["name"] == name]
        out[name] = {k: sum(r[k] for r in rs) / len(rs) for k in SUMMARY_KEYS}
        out[name].update(
            {f"{k}_per_seed": [r[k] for r in rs] for k in ("maxvio_batch_last", "maxvio_global", "eval_loss")}
        )
    return out


def table(summary):
    ref = summary["aux_loss a=1e-3"]["eval_loss"]
    lines = [
        f"{'variant':<18} {'MaxVio_batch first25%':>21} {'last25%':>8} {'MaxVio_global':>13} "
        f"{'eval loss':>9} {'vs aux':>7} {'bias norm':>9} {'s':>5}"
    ]
    for name, r in summary.items():
        rel = (r["eval_loss"] / ref - 1) * 100
        lines.append(
            f"{name:<18} {r['maxvio_batch_first']:>21.3f} {r['maxvio_batch_last']:>8.3f} "
            f"{r['maxvio_global']:>13.3f} {r['eval_loss']:>9.4f} {rel:>+6.2f}% {r['bias_norm']:>9.4f} "
            f"{r['seconds']:>5.0f}"
        )
    return "\n".join(lines)


def verdict(by):
    """The claim's checks on one summary (or one seed's runs keyed by name)."""
    none, aux, af = by["none"], by["aux_loss a=1e-3"], by["aux_free u=0.001"]
    return {
        "maxvio_global: aux_free(1e-3) <= none / 5": af["maxvio_global"] <= none["maxvio_global"] / 5,
        "maxvio_batch_last: aux_free(1e-3) <= none / 5": af["maxvio_batch_last"] <= none["maxvio_batch_last"] / 5,
        "maxvio_global: aux_free(1e-3) < aux_loss": af["maxvio_global"] < aux["maxvio_global"],
        "maxvio_batch_last: aux_free(1e-3) < aux_loss": af["maxvio_batch_last"] < aux["maxvio_batch_last"],
        "eval_loss: aux_free(1e-3) <= 1.02 * aux_loss": af["eval_loss"] <= 1.02 * aux["eval_loss"],
    }


def plot(runs, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = 10
    for r in runs:
        for ax, key in zip(axes, ("maxvio", "loss")):
            y = torch.tensor(r["curve"][key])
            sm = torch.nn.functional.avg_pool1d(y[None, None], k, 1).flatten() if len(y) >= k else y
            ax.plot(range(len(y) - len(sm) + 1, len(y) + 1), sm.tolist(), label=r["name"])
    axes[0].set(title=f"MaxVio_batch (mean over layers, {k}-step average), seed 0", xlabel="step", yscale="log")
    axes[1].set(title="training LM loss", xlabel="step")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="25 steps, smaller corpus, 1 seed; writes nothing")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (init weights and batch order)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="moe_balance")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = 25 if args.quick else args.steps
    seeds = 1 if args.quick else args.seeds
    t0 = time.time()
    train, held_out, n_chars = build_data(200_000 if args.quick else MAX_CHARS)
    if args.quick:
        held_out = held_out[:64]
    print(
        f"corpus: {n_chars} chars, {train.numel()} train / {held_out.numel()} held-out tokens "
        f"({time.time() - t0:.1f}s)",
        flush=True,
    )
    runs, per_seed = [], []
    for seed in range(seeds):
        init_state = {k: v.clone() for k, v in make_model(seed).state_dict().items()}
        for name, mode, rate in variants():
            r = train_run(name, mode, rate, init_state, train, held_out, steps, seed)
            r["seed"] = seed
            runs.append(r)
            print(
                f"  seed {seed} {name}: MaxVio_batch last {r['maxvio_batch_last']:.3f}, global "
                f"{r['maxvio_global']:.3f}, eval loss {r['eval_loss']:.4f} ({r['seconds']}s)",
                flush=True,
            )
        checks = verdict({r["name"]: r for r in runs if r["seed"] == seed})
        per_seed.append(checks)
    summary = summarise(runs)
    print(f"means over {seeds} seed(s), {steps} steps:")
    print(table(summary))
    checks = verdict(summary)
    for k, v in checks.items():
        n_ok = sum(c[k] for c in per_seed)
        print(f"  {'PASS' if v else 'FAIL'}  {k}   (mean over seeds; holds in {n_ok}/{seeds} seeds)")
    result = {
        "setting": {
            "seq": SEQ,
            "batch": BATCH,
            "vocab": VOCAB,
            "experts": N_EXPERTS,
            "top_k": TOP_K,
            "layers": 2,
            "hidden": 64,
            "lr": LR,
            "warmup": WARMUP,
            "steps": steps,
            "seeds": seeds,
            "aux_alpha": AUX_ALPHA,
            "corpus_chars": n_chars,
            "python": sys.version.split()[0],
            "train_tokens": train.numel(),
            "held_out_tokens": held_out.numel(),
        },
        "summary": summary,
        "claim_checks": checks,
        "claim_checks_per_seed": per_seed,
        "claim_holds": all(checks.values()),
        "runs": runs,
    }
    if not args.quick:
        write_json_atomic(args.out / f"{args.name}.json", result, indent=1)
        plot([r for r in runs if r["seed"] == 0], args.out / f"{args.name}.png")
        print(f"wrote {args.out / (args.name + '.json')} and .png ({time.time() - t0:.0f}s)")
    return result


if __name__ == "__main__":
    main()

"""The eval tasks and their registry, ``EVAL_TASKS``: one explicit dict from task name to (function, description,
whether it runs data-parallel).

A task is ``fn(ctx: EvalContext, **config) -> dict``: ``{"metrics": {name: float}, ...}`` plus optional extras
the report plots (``curves``: name -> {"x": [...], "y": [...]}; ``per_layer``: layer -> value). Its keyword
arguments are the task's config (``--tasks math`` uses the defaults; an eval recipe or ``--task_config`` sets
them) and they are part of the result-cache key; ``CHECKS`` refuses impossible configs before any model loads.
Every task fixes its seeds; generation and scoring go through ``ctx.map_batches`` so that N processes give the
numbers of one (see ``evals/common.py``).

The modules only some tasks need (``recipes.models``, ``data.loading``, ``evals.unlearning``,
``trainers.moe_balance``: transformers, TRL, datasets, scikit-learn) are imported inside those tasks, so that
``posttrain list evals`` loads none of them.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from posttrain.evals.arithmetic import pass_at_k
from posttrain.evals.common import EvalContext, completion_logps, eval_rows, generate, load_checkpoint, mean, render
from posttrain.evals.lm_harness import check_lm_eval, lm_eval
from posttrain.evals.optibench import check_optibench, optibench
from posttrain.trainers.rewards import numeric_match, reward_functions


def _reference_logps(ctx: EvalContext, reference: str, pairs):
    ref, _, _ = load_checkpoint(reference, device=str(ctx.device))
    try:
        return ctx.map_batches(pairs, lambda batch, _: completion_logps(ref, ctx.tokenizer, batch))  # noqa: F821 (del below)
    finally:
        del ref


_warned_no_reference = False


def preference(
    ctx: EvalContext,
    dataset: str = "builtin:preference_pairs",
    num_samples: int = 256,
    reference: str | None = None,
    reward_model: str | None = None,
    beta: float = 0.1,
    split: str | None = None,
):
    """Held-out preference accuracy and mean margin. With ``reference`` (a checkpoint): DPO's implicit reward
    r = beta (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5); with ``reward_model`` (a reward recipe's
    output): its score, on the reward model's own tokens (``reward_model_scores``); with neither: the policy's own
    log-likelihood, reported twice: ``accuracy``/``margin`` with r = beta log pi(y|x) (DPO's implicit reward with its
    reference term left out, which favours the shorter answer) and ``accuracy_length_normalised`` with
    r = log pi(y|x) / |y|, the mean log-prob per completion token (SimPO's reward without its beta, Meng et al.
    2024, arXiv 2405.14734). accuracy = mean [r_chosen > r_rejected], ties 1/2."""
    global _warned_no_reference

    rows = eval_rows(dataset, "preference", split=split, num_samples=num_samples, seed=ctx.seed, limit=ctx.limit)
    prompts = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
    n = len(rows)
    if reward_model is not None:
        scores = reward_model_scores(
            ctx, reward_model, [*zip(prompts, rows["chosen"]), *zip(prompts, rows["rejected"])]
        )
        return {"metrics": preference_metrics(scores[:n], scores[n:])}
    pairs = [render(ctx.tokenizer, p, c) for p, c in zip(prompts, rows["chosen"])]
    pairs += [render(ctx.tokenizer, p, r) for p, r in zip(prompts, rows["rejected"])]
    scored = ctx.map_batches(pairs, lambda batch, _: completion_logps(ctx.model, ctx.tokenizer, batch))
    logps = [lp for lp, _ in scored]
    if reference is not None:
        ref = [lp for lp, _ in _reference_logps(ctx, reference, pairs)]
        scores = [beta * (a - b) for a, b in zip(logps, ref)]
        return {"metrics": preference_metrics(scores[:n], scores[n:])}
    if not _warned_no_reference:
        _warned_no_reference = True
        warnings.warn(
            "eval task 'preference' without a reference: its accuracy ranks answers by the policy's own "
            "log-likelihood, which favours the shorter answer whatever the model learned; give the model "
            "the policy was trained from as `reference` for DPO's implicit reward",
            stacklevel=2,
        )
    metrics = preference_metrics([beta * lp for lp in logps[:n]], [beta * lp for lp in logps[n:]])
    per_token = [lp / max(tokens, 1) for lp, tokens in scored]
    normalised = preference_metrics(per_token[:n], per_token[n:])
    metrics.update(
        {
            "accuracy_length_normalised": normalised["accuracy"],
            "margin_length_normalised": normalised["margin"],
            "chosen_tokens": mean(t for _, t in scored[:n]),
            "rejected_tokens": mean(t for _, t in scored[n:]),
        }
    )
    note = (
        "no `reference`: `accuracy` and `margin` are DPO's implicit reward beta log pi(y|x) with its reference term "
        "left out (it favours the shorter answer: compare `chosen_tokens` and `rejected_tokens`); "
        "`accuracy_length_normalised` ranks by the mean log-prob per token (SimPO's reward). DPO's implicit reward "
        "proper needs the reference model: set `reference`."
    )
    return {"metrics": metrics, "note": note}


def preference_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """accuracy (a tie counts half: the reference itself, whose implicit rewards are all 0, reads 0.5), mean margin and
    mean rewards of paired chosen / rejected scores."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "accuracy": mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins),
        "margin": mean(margins),
        "chosen_reward": mean(chosen),
        "rejected_reward": mean(rejected),
        "pairs": float(len(margins)),
    }


def reward_model_ids(tokenizer, prompt, completion) -> list[int]:
    """The token ids of one (prompt, completion) row as TRL's RewardTrainer gives them to the reward model it trains,
    with the reward model's own tokenizer: a conversation through its chat template (contents joined by blank lines
    when it has none), plain text as prompt + completion + EOS with its special tokens."""
    conversational = isinstance(completion, list)
    if conversational and getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template((prompt or []) + completion, tokenize=True, return_dict=True)["input_ids"]
        )
    if conversational:
        text = "\n\n".join(m.get("content") or "" for m in (prompt or []) + completion)
    else:
        text = (prompt or "") + completion
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        text += eos
    return list(tokenizer(text)["input_ids"])


def reward_model_scores(ctx: EvalContext, path: str, rows: list[tuple]) -> list[float]:
    """The reward model's score of each (prompt, completion) row, tokenized by its own tokenizer (and chat template):
    a reward model reads the tokens it was trained on, not the policy's."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import ModelConfig

    from posttrain.recipes.models import load_tokenizer, resolve_model_path

    folder = resolve_model_path(path)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=folder))
    rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).to(ctx.device).eval()
    if rm.config.pad_token_id is None:  # the classifier scores the last token before the padding
        rm.config.pad_token_id = tokenizer.pad_token_id
    pad = rm.config.pad_token_id if rm.config.pad_token_id is not None else 0
    ids = [reward_model_ids(tokenizer, p, c) for p, c in rows]

    @torch.no_grad()
    def score(batch, _):
        width = max(len(r) for r in batch)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=ctx.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=ctx.device)
        return rm(input_ids=input_ids, attention_mask=attention).logits[:, 0].float().tolist()  # noqa: F821 (del below)

    try:
        return ctx.map_batches(ids, score)
    finally:
        del rm


def perplexity(
    ctx: EvalContext,
    dataset: str = "builtin:fictitious_facts",
    split: str = "retain",
    column: str = "text",
    num_samples: int = 256,
    max_length: int = 1024,
):
    """exp(mean negative log-likelihood per token) over a set of texts (every token but each text's first)."""
    rows = eval_rows(dataset, "", split=split, num_samples=num_samples, seed=ctx.seed, limit=ctx.limit)
    if column not in rows.column_names:
        raise ValueError(
            f"perplexity: dataset '{dataset}' has no '{column}' column (columns: {rows.column_names}); set column"
        )
    scored = ctx.map_batches(
        [("", t) for t in rows[column]], lambda batch, _: completion_logps(ctx.model, ctx.tokenizer, batch, max_length)
    )
    nll, tokens = -math.fsum(lp for lp, _ in scored), sum(n for _, n in scored)
    return {"metrics": {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": float(tokens)}}


def math_task(
    ctx: EvalContext,
    dataset: str = "builtin:arithmetic",
    difficulty: int | None = 1,
    num_samples: int = 64,
    n: int = 16,
    k: tuple = (1, 2, 4, 8, 16),
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    split: str | None = None,
):
    """Greedy accuracy and pass@k (unbiased estimator, Chen et al. 2021) from ``n`` samples per prompt, on
    prompt/answer data; a completion is correct when its last number equals the answer (``numeric_match``)."""
    check_math(n=n, k=k, temperature=temperature)
    builtin_arith = dataset == "builtin:arithmetic"
    rows = eval_rows(
        dataset,
        "prompt",
        split=split,
        num_samples=num_samples,
        seed=ctx.seed,
        limit=ctx.limit,
        difficulty=difficulty if builtin_arith else None,
    )
    items = list(zip(rows["prompt"], (str(a) for a in rows["answer"])))

    def run(batch, index):
        prompts, answers = [p for p, _ in batch], [a for _, a in batch]
        greedy = [g[0] for g in generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=max_new_tokens)]
        samples = generate(
            ctx.model,
            ctx.tokenizer,
            prompts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=ctx.seed * 1_000_003 + index,
        )
        return [
            (g, int(sum(numeric_match(s, [a] * n))))
            for g, s, a in zip(numeric_match(greedy, answers), samples, answers)
        ]

    results = ctx.map_batches(items, run)
    ks = sorted(set(int(x) for x in k))
    curve = [mean(pass_at_k(n, c, kk) for _, c in results) for kk in ks]
    metrics = {"greedy_accuracy": mean(g for g, _ in results)}
    metrics.update({f"pass@{kk}": v for kk, v in zip(ks, curve)})
    return {"metrics": metrics, "curves": {"pass@k": {"x": ks, "y": curve}}}


def check_math(n: int, k, temperature: float, **_) -> None:
    """The math options that would fail only after the model loaded and generated."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if not k or min(k) < 1:
        raise ValueError(f"k must be a list of integers >= 1 (got {list(k)})")
    if max(k) > n:
        raise ValueError(f"pass@{max(k)} needs n >= {max(k)} samples per prompt (n={n}); raise n or drop k > {n}")
    if n > 1 and temperature <= 0:  # transformers refuses n greedy sequences per prompt
        raise ValueError(
            f"n={n} samples per prompt need temperature > 0 (got {temperature}); greedy accuracy is "
            "measured anyway, or set n: 1, k: [1]"
        )


def reward(
    ctx: EvalContext,
    reward_funcs: tuple = ("vader_sentiment", "offensiveness_cost"),
    dataset: str = "builtin:review_prompts",
    num_samples: int = 64,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    split: str | None = None,
):
    """Mean score of the model's completions under named reward functions (``posttrain list rewards``)."""

    class _Config:  # what the reward builders read
        max_completion_length = max_new_tokens

    funcs = reward_functions(list(reward_funcs), _Config())
    rows = eval_rows(dataset, "prompt", split=split, num_samples=num_samples, seed=ctx.seed, limit=ctx.limit)
    columns = [c for c in rows.column_names if c != "prompt"]
    items = [dict(zip(rows.column_names, values)) for values in zip(*(rows[c] for c in rows.column_names))]

    def run(batch, index):
        completions = [
            c[0]
            for c in generate(
                ctx.model,
                ctx.tokenizer,
                [r["prompt"] for r in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=ctx.seed * 1_000_003 + index,
            )
        ]
        ids = [ctx.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        extra = {c: [r[c] for r in batch] for c in columns}
        scores = [
            f(prompts=[r["prompt"] for r in batch], completions=completions, completion_ids=ids, **extra) for f in funcs
        ]
        return list(zip(*scores))

    scores = ctx.map_batches(items, run)
    return {"metrics": {name: mean(s[i] for s in scores) for i, name in enumerate(reward_funcs)}}


def unlearning(
    ctx: EvalContext,
    dataset: str = "builtin:fictitious_authors",
    forget: str = "forget05",
    retain: str = "retain",
    world: str = "world_facts",
    holdout: str | None = None,
    num_samples: int = 400,
    data_seed: int = 0,
    retain_model: str | None = None,
    max_new_tokens: int = 200,
):
    """The TOFU metrics as open-unlearning computes them (``posttrain.evals.unlearning``: truth ratios, answer
    probability, ROUGE-L recall of greedy answers of ``max_new_tokens`` at most, Model Utility, and against
    ``holdout`` forget quality, the loss / zlib / min-k / min-k++ membership attacks and privleak), plus forget and
    retain loss and token accuracy. ``retain_model``: a checkpoint trained on the retain set alone, for TOFU's own
    forget quality (``forget_quality_vs_retain_model``) and privleak's reference AUC. Computed on rank 0."""
    check_unlearning(max_new_tokens=max_new_tokens)
    # the unlearning sets are the *training* splits (the run's data seed, 0 by default), not held-out ones:
    # forgetting is measured on what the model was trained, then made to forget
    from posttrain.data.loading import load_source
    from posttrain.evals.unlearning import reference_mia_min_k, truth_ratios, unlearning_metrics

    def split(name):
        if name is None:
            return None
        rows = load_source(dataset, split=name, num_samples=num_samples, seed=data_seed)
        return rows.select(range(min(ctx.limit, len(rows)))) if ctx.limit else rows

    forget_rows, holdout_rows, reference, reference_auc = split(forget), split(holdout), None, None
    if retain_model is not None:
        model, tokenizer, _ = load_checkpoint(retain_model, device=str(ctx.model.device))
        reference = truth_ratios(model, tokenizer, list(forget_rows), batch_size=ctx.batch_size)
        if holdout_rows is not None:
            reference_auc = reference_mia_min_k(model, tokenizer, forget_rows, holdout_rows, batch_size=ctx.batch_size)
        del model
    metrics = unlearning_metrics(
        ctx.model,
        ctx.tokenizer,
        forget_rows,
        split(retain),
        split(world),
        holdout_rows,
        batch_size=ctx.batch_size,
        reference_forget_ratios=reference,
        reference_mia_min_k=reference_auc,
        max_new_tokens=max_new_tokens,
    )
    return {"metrics": metrics}


def check_unlearning(max_new_tokens: int, **_) -> None:
    if max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be >= 1 (got {max_new_tokens}): ROUGE scores the greedy answers; "
            "open-unlearning generates up to 200 tokens"
        )


def moe_balance(
    ctx: EvalContext,
    dataset: str = "builtin:fictitious_facts",
    split: str = "retain",
    column: str = "text",
    num_samples: int = 256,
    max_length: int = 512,
):
    """MaxVio_global (Wang et al. 2024) and per-layer expert loads of an MoE model on a text set."""
    from posttrain.evals.moe_load import maxvio_global

    rows = eval_rows(dataset, "", split=split, num_samples=num_samples, seed=ctx.seed, limit=ctx.limit)
    result = maxvio_global(ctx.model, ctx.tokenizer, rows[column], batch_size=ctx.batch_size, max_length=max_length)
    metrics = {k: result[k] for k in ("maxvio_global", "maxvio_global_max", "load_entropy")}
    return {"metrics": metrics, "per_layer": result["per_layer"], "loads": result["loads"]}


# name -> (function, description, runs on every process (data-parallel) or on rank 0 only)
EVAL_TASKS: dict[str, tuple] = {
    "preference": (
        preference,
        "held-out preference accuracy and margin (implicit DPO reward vs a reference, or a reward model)",
        True,
    ),
    "perplexity": (perplexity, "perplexity of a text set", True),
    "math": (math_task, "greedy accuracy and pass@k (unbiased, k up to n) on prompt/answer data", True),
    "reward": (reward, "mean score of completions under named reward functions (sentiment, offensiveness, ...)", True),
    "unlearning": (
        unlearning,
        "open-unlearning's TOFU metrics: truth ratio, probability, ROUGE, model utility, forget quality, MIA, privleak",
        False,
    ),
    "moe_balance": (moe_balance, "MaxVio_global and per-layer expert loads of an MoE model", False),
    "lm_eval": (lm_eval, "EleutherAI lm-evaluation-harness tasks (local task YAMLs work offline)", True),
    "optibench": (
        optibench,
        "OptiBench (E-OPT): solver code from word problems, run sandboxed; accuracy per type, code pass rate",
        True,
    ),
}

# name -> check(**config with the defaults filled in), raising ValueError: run on every task config when the eval
# spec is made, before any model loads (the tasks call them too, for direct callers)
CHECKS: dict[str, Callable[..., None]] = {
    "math": check_math,
    "lm_eval": check_lm_eval,
    "unlearning": check_unlearning,
    "optibench": check_optibench,
}

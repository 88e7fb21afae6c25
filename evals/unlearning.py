"""Unlearning metrics on QA sets, as open-unlearning defines them for TOFU (Maini et al. 2024, arXiv 2401.06121;
Dorna et al. 2025, "OpenUnlearning", arXiv 2506.12618, https://github.com/locuslab/open-unlearning).

``unlearning_metrics(model, tokenizer, forget, retain, world, holdout=None)`` scores datasets of {prompt, completion}
rows (with ``paraphrased`` / ``perturbed`` columns for the truth ratio), e.g. the splits of
``builtin:fictitious_authors``. The definitions followed, file by file of open-unlearning (commit d3d7cf9):

- per row, the answer's token-mean cross-entropy L (prompt tokens excluded, EOS included) and its length-normalised
  probability P = exp(-L): ``evaluate_probability`` in ``src/evals/metrics/utils.py``;
- ``<set>_Q_A_Prob``: the mean over rows of P (``probability`` in ``src/evals/metrics/memorization.py``);
- ``wf_Q_A_Prob_normalised``: the mean over rows of P(answer) / (P(answer) + sum_j P(wrong_j)), P length-normalised
  as above (``probability_w_options``, same file; ``configs/eval/tofu_metrics/wf_Q_A_Prob_normalised.yaml``);
- truth ratio, the geometric form: per row TR = exp(-mean_j L(wrong_j)) / (exp(-L(true)) + 1e-10), ``true`` the
  row's ``paraphrased`` answer (TOFU's PARA set; for world facts it is the answer itself, as TOFU's
  ``wf_Truth_Ratio`` uses ``wf_Q_A_Prob``), and aggregated (``truth_ratio``, same file) as
  ``closer_to_1_better`` = mean(min(TR, 1/TR)) on the forget set (``forget_truth_ratio``: 1 = the model cannot
  tell the true answer from the wrong ones) and ``true_better`` = mean(max(0, 1 - TR)) on the others
  (``retain_Truth_Ratio``, ``wf_Truth_Ratio``: 1 = the true answer is far likelier);
- ``<set>_Q_A_ROUGE``: the mean over rows of the ROUGE-L recall (``rouge-score``, Porter stemmer) of the greedy
  answer against the true answer (``eval_text_similarity`` in ``utils.py``; ``rouge_type: rougeL_recall`` in
  ``configs/eval/tofu_metrics/*_Q_A_ROUGE.yaml``; ``configs/generation/default.yaml``: greedy, 200 new tokens);
- ``model_utility``: the harmonic mean (``hm_aggregate`` in ``src/evals/metrics/utility.py``) of retain_Q_A_Prob,
  retain_Q_A_ROUGE, retain_Truth_Ratio, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE, wf_Truth_Ratio
  (``configs/eval/tofu_metrics/model_utility.yaml``). TOFU also averages in three real-authors metrics (ra_*); the
  built-in data has no real-authors set, so here Model Utility is over six values, not nine, and not directly
  comparable with a TOFU number;
- membership inference (``src/evals/metrics/mia/``), a score per row where higher = "less likely a member", and
  ``mia_<attack>`` = ROC AUC with forget rows labelled 0 and holdout rows 1 (``mia_auc`` in ``mia/utils.py``:
  1 = the forget set is told apart as seen, 0.5 = as unseen): ``mia_loss`` (L, ``loss.py``), ``mia_zlib``
  (L / zlib-compressed length of the answer text, ``zlib.py``), ``mia_min_k`` (minus the mean of the lowest k
  fraction of the answer tokens' log-probs, EOS excluded, k = 0.4 as in ``configs/eval/tofu_metrics/mia_min_k.yaml``,
  ``min_k.py``) and ``mia_min_k_plus_plus`` (the same over (log p - mu) / sigma, mu and sigma^2 the mean and
  variance of log p under the model's own next-token distribution, ``min_k_plus_plus.py``; Zhang et al. 2024);
- ``privleak`` (with ``holdout``), as ``privleak`` in ``src/evals/metrics/privacy.py``: 100 (s - r) / r with
  s = 1 - mia_min_k and r = 1 - (the retain-only model's mia_min_k), or r = 1 - 0.5 without one
  (``configs/eval/tofu_metrics/privleak.yaml``: ``ref_value: 0.5``). 0 = the forget set leaks as little as for a
  model that never saw it; negative = it is still told apart.

Kept from before (not open-unlearning's): ``<set>_loss`` (mean L), ``<set>_acc`` (per-row mean of teacher-forced
argmax == answer token, then the mean over rows), ``forget_quality`` (with ``holdout``: the two-sample KS p-value
between the forget and holdout truth ratios of the same model, the never-trained holdout standing in for a retrained
model) and ``forget_quality_vs_retain_model`` (with ``reference_forget_ratios``, a retain-only model's forget truth
ratios: this is open-unlearning's ``forget_quality``, ``ks_test`` in ``privacy.py``).

scikit-learn, SciPy and rouge-score are imported inside the metrics that use them (start-up time of ``posttrain``).
"""

from __future__ import annotations

import math
import zlib

import torch

from posttrain.data.unlearning import collate, encode_row
from posttrain.evals.common import generate

MIA_K = 0.4  # configs/eval/tofu_metrics/mia_min_k.yaml and mia_min_k_plus_plus.yaml
ROUGE_MAX_NEW_TOKENS = 200  # configs/generation/default.yaml


# ------------------------------------------------------------------------------------------------ pure math


def truth_ratio(true_loss: float, wrong_losses) -> float:
    """TR = exp(-mean_j L(wrong_j)) / (exp(-L(true)) + 1e-10), L the token-mean cross-entropy."""
    wrong = sum(wrong_losses) / len(wrong_losses)
    return math.exp(-wrong) / (math.exp(-true_loss) + 1e-10)


def closer_to_1_better(ratios) -> float:
    """mean(min(TR, 1/TR)): 1 when the true and the wrong answers are equally likely (the forget set's aim)."""
    return sum(min(r, 1 / (r + 1e-10)) for r in ratios) / len(ratios)


def true_better(ratios) -> float:
    """mean(max(0, 1 - TR)): 1 when the true answer is far likelier than the wrong ones (the sets to keep)."""
    return sum(max(0.0, 1 - r) for r in ratios) / len(ratios)


def min_k_score(token_logps, k: float = MIA_K) -> float:
    """Min-k% Prob (Shi et al. 2024): minus the mean of the lowest ceil-down(k n), at least 1, token log-probs."""
    values = sorted(float(x) for x in token_logps)
    if not values:
        return 0.0
    low = values[: max(1, int(len(values) * k))]
    return -sum(low) / len(low)


def min_k_plus_plus_score(token_logps, mu, sigma2, k: float = MIA_K) -> float:
    """Min-k%++ (Zhang et al. 2024): min_k over (log p(x_t) - mu_t) / sqrt(max(sigma2_t, 1e-6))."""
    z = [(lp - m) / math.sqrt(max(s, 1e-6)) for lp, m, s in zip(token_logps, mu, sigma2)]
    return min_k_score(z, k)


def zlib_score(avg_loss: float, text: str) -> float:
    """Carlini et al. 2021: the loss over the zlib-compressed length (bytes) of the text."""
    return avg_loss / len(zlib.compress(text.encode("utf-8")))


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC of the attack scores with forget rows labelled 0 and holdout rows 1 (higher score = less likely
    seen): 1 when every forget row scores below every holdout row."""
    from sklearn.metrics import roc_auc_score

    if not forget_scores or not holdout_scores:
        raise ValueError("mia_auc needs at least one score on each side")
    return float(
        roc_auc_score([0] * len(forget_scores) + [1] * len(holdout_scores), list(forget_scores) + list(holdout_scores))
    )


def auc(positive, negative) -> float:
    """ROC AUC of scores where positives should score higher: P(pos > neg) + P(pos == neg) / 2."""
    from sklearn.metrics import roc_auc_score

    if not positive or not negative:
        raise ValueError("auc needs at least one score on each side")
    return float(roc_auc_score([1] * len(positive) + [0] * len(negative), list(positive) + list(negative)))


def privleak(auc: float, reference_auc: float = 0.5) -> float:
    """100 ((1 - auc) - (1 - ref)) / (1 - ref): the relative gap to a model that never saw the forget set."""
    score, ref = 1 - auc, 1 - reference_auc
    return (score - ref) / (ref + 1e-10) * 100


def rouge_l_recall(predictions, references) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (``rouge-score``, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def harmonic_mean(values) -> float:
    """scipy's hmean (what open-unlearning's ``hm_aggregate`` calls); 0 when any value is 0."""
    from scipy.stats import hmean

    return float(hmean(list(values)))


# ------------------------------------------------------------------------------------------------ model passes


@torch.no_grad()
def row_stats(model, tokenizer, rows, batch_size=16, max_length=512, prompt_template="{prompt}", answers=None):
    """Per row a dict: ``loss`` (token-mean CE of the answer), ``acc`` (fraction of answer tokens that are the
    argmax), ``n`` (answer tokens), and, over the answer tokens but the last (EOS), ``logps`` (log p of each),
    ``mu`` / ``sigma2`` (mean and variance of log p under the next-token distribution), ``text`` (the answer
    tokens decoded, special tokens skipped). ``answers`` (one string per row) replaces the rows' completions."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        encode_row(tokenizer, row, max_length, prompt_template, None if answers is None else answers[i])
        for i, row in enumerate(rows)
    ]
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(encoded[start : start + batch_size], pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        logp = torch.log_softmax(logits, -1)
        target = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        correct = (logits.argmax(-1) == labels) & valid
        for i in range(labels.shape[0]):
            positions = valid[i].nonzero()[:, 0]
            n = int(positions.numel())
            scored = positions[:-1] if n > 1 else positions  # open-unlearning: "-1 to ignore eos prediction"
            dist = logp[i, scored]
            mu = (dist.exp() * dist).sum(-1)
            sigma2 = (dist.exp() * dist.square()).sum(-1) - mu.square()
            out.append(
                {
                    "loss": float(-target[i, positions].sum()) / n,
                    "acc": float(correct[i].sum()) / n,
                    "n": n,
                    "logps": target[i, scored].tolist(),
                    "mu": mu.tolist(),
                    "sigma2": sigma2.tolist(),
                    "text": tokenizer.decode(labels[i, positions].tolist(), skip_special_tokens=True).strip(),
                }
            )
    return out


def answer_stats(model, tokenizer, rows, **kwargs):
    """Per row: (token-mean CE of the answer, correct answer tokens, answer tokens)."""
    return [(s["loss"], round(s["acc"] * s["n"]), s["n"]) for s in row_stats(model, tokenizer, rows, **kwargs)]


def _answer(row) -> str:
    completion = row["completion"]
    return completion if isinstance(completion, str) else "".join(m.get("content") or "" for m in completion)


def option_losses(model, tokenizer, rows, **kwargs):
    """(L(true) per row, [L(wrong_j)] per row): ``true`` the ``paraphrased`` answer when the rows have one."""
    paraphrased = [r["paraphrased"] for r in rows] if "paraphrased" in rows[0] else None
    true = [s["loss"] for s in row_stats(model, tokenizer, rows, answers=paraphrased, **kwargs)]
    wrong = [[] for _ in rows]
    for j in range(len(rows[0]["perturbed"])):
        for i, s in enumerate(row_stats(model, tokenizer, rows, answers=[r["perturbed"][j] for r in rows], **kwargs)):
            wrong[i].append(s["loss"])
    return true, wrong


def truth_ratios(model, tokenizer, rows, **kwargs):
    """Per row TR (``truth_ratio``) of the row's ``perturbed`` answers against its ``paraphrased`` one (or its
    answer)."""
    true, wrong = option_losses(model, tokenizer, rows, **kwargs)
    return [truth_ratio(t, w) for t, w in zip(true, wrong)]


def greedy_answers(
    model, tokenizer, rows, batch_size=16, prompt_template="{prompt}", max_new_tokens=ROUGE_MAX_NEW_TOKENS
):
    """The model's greedy answer to each row's prompt (chat template for conversational rows), stripped."""
    prompts = [
        r["prompt"] if isinstance(r["prompt"], list) else prompt_template.format(prompt=r["prompt"]) for r in rows
    ]
    out = []
    for start in range(0, len(prompts), batch_size):
        out += [
            g[0].strip()
            for g in generate(model, tokenizer, prompts[start : start + batch_size], max_new_tokens=max_new_tokens)
        ]
    return out


# ------------------------------------------------------------------------------------------------ the metrics

_PREFIX = {"forget": "forget", "retain": "retain", "world": "wf", "holdout": "holdout"}


def unlearning_metrics(
    model,
    tokenizer,
    forget,
    retain,
    world,
    holdout=None,
    batch_size=16,
    max_length=512,
    prompt_template="{prompt}",
    reference_forget_ratios=None,
    reference_mia_min_k=None,
    max_new_tokens=ROUGE_MAX_NEW_TOKENS,
    k=MIA_K,
):
    """The module docstring's metrics; ``world`` or ``holdout`` may be None (their metrics are then left out).
    ``reference_mia_min_k``: a retain-only model's ``mia_min_k`` on the same forget / holdout rows, for privleak
    (else privleak is against 0.5, open-unlearning's ``ref_value``)."""
    from scipy.stats import ks_2samp  # scipy comes with scikit-learn (alt-profanity-check's pinned dependency)

    was_training = model.training
    model.eval()
    kwargs = dict(batch_size=batch_size, max_length=max_length, prompt_template=prompt_template)
    results, ratios, stats = {}, {}, {}
    try:
        for name, data in (("forget", forget), ("retain", retain), ("world", world), ("holdout", holdout)):
            if data is None:
                continue
            rows, prefix = list(data), _PREFIX[name]
            stats[name] = row_stats(model, tokenizer, rows, **kwargs)
            probs = [math.exp(-s["loss"]) for s in stats[name]]
            results[f"{name}_loss"] = sum(s["loss"] for s in stats[name]) / len(rows)
            results[f"{name}_acc"] = sum(s["acc"] for s in stats[name]) / len(rows)
            results[f"{prefix}_Q_A_Prob"] = sum(probs) / len(rows)
            if name != "holdout":
                generated = greedy_answers(model, tokenizer, rows, batch_size, prompt_template, max_new_tokens)
                scores = rouge_l_recall(generated, [_answer(r) for r in rows])
                results[f"{prefix}_Q_A_ROUGE"] = sum(scores) / len(rows)
            if "perturbed" in rows[0]:
                true, wrong = option_losses(model, tokenizer, rows, **kwargs)
                ratios[name] = [truth_ratio(t, w) for t, w in zip(true, wrong)]
                if name in ("forget", "holdout"):
                    results[f"{prefix}_truth_ratio"] = closer_to_1_better(ratios[name])
                else:
                    results[f"{prefix}_Truth_Ratio"] = true_better(ratios[name])
                if name == "world":  # the answer (not a paraphrase) against the wrong options
                    results["wf_Q_A_Prob_normalised"] = sum(
                        p / (p + sum(math.exp(-x) for x in w) + 1e-10) for p, w in zip(probs, wrong)
                    ) / len(rows)
    finally:
        model.train(was_training)
    utility = (
        "retain_Q_A_Prob",
        "retain_Q_A_ROUGE",
        "retain_Truth_Ratio",
        "wf_Q_A_Prob_normalised",
        "wf_Q_A_ROUGE",
        "wf_Truth_Ratio",
    )
    if all(key in results for key in utility):
        results["model_utility"] = harmonic_mean(results[key] for key in utility)
    if reference_forget_ratios is not None and "forget" in ratios:
        results["forget_quality_vs_retain_model"] = float(ks_2samp(ratios["forget"], reference_forget_ratios).pvalue)
    if holdout is not None:
        if "forget" in ratios and "holdout" in ratios:
            results["forget_quality"] = float(ks_2samp(ratios["forget"], ratios["holdout"]).pvalue)
        results.update(mia_aucs(stats["forget"], stats["holdout"], k))
        results["privleak"] = privleak(
            results["mia_min_k"], 0.5 if reference_mia_min_k is None else reference_mia_min_k
        )
    return results


def attack_scores(stats, k=MIA_K) -> dict[str, list[float]]:
    """Each attack's per-row score (higher = less likely seen) from ``row_stats``."""
    return {
        "mia_loss": [s["loss"] for s in stats],
        "mia_zlib": [zlib_score(s["loss"], s["text"]) for s in stats],
        "mia_min_k": [min_k_score(s["logps"], k) for s in stats],
        "mia_min_k_plus_plus": [min_k_plus_plus_score(s["logps"], s["mu"], s["sigma2"], k) for s in stats],
    }


def mia_aucs(forget_stats, holdout_stats, k=MIA_K) -> dict[str, float]:
    """``mia_<attack>``: each attack's AUC between forget (members) and holdout (non-members) rows."""
    f, h = attack_scores(forget_stats, k), attack_scores(holdout_stats, k)
    return {name: mia_auc(f[name], h[name]) for name in f}


def reference_mia_min_k(model, tokenizer, forget, holdout, batch_size=16, k=MIA_K, **kwargs) -> float:
    """A (retain-only) reference model's ``mia_min_k`` on the forget / holdout rows: privleak's reference."""
    f = row_stats(model, tokenizer, list(forget), batch_size=batch_size, **kwargs)
    h = row_stats(model, tokenizer, list(holdout), batch_size=batch_size, **kwargs)
    return mia_auc([min_k_score(s["logps"], k) for s in f], [min_k_score(s["logps"], k) for s in h])

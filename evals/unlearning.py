"""Unlearning metrics on QA sets, in the spirit of TOFU (Maini et al. 2024, arXiv 2401.06121).

``unlearning_metrics(model, tokenizer, forget, retain, world, holdout=None)`` scores datasets of {prompt, completion}
(or {text}) rows, e.g. the splits of ``builtin:fictitious_authors``:

- ``<set>_loss``: mean over rows of the row's token-mean cross-entropy of the answer tokens (prompt tokens excluded);
- ``<set>_acc``: teacher-forced token accuracy, argmax next token == answer token, pooled over the set's tokens;
- ``<set>_truth_ratio`` (rows with a ``perturbed`` column of wrong answers): the mean over rows of
  R = mean_j P(wrong_j)^(1/|wrong_j|) / P(true)^(1/|true|), with P^(1/n) = exp(-token-mean CE), where ``true`` is
  the row's ``paraphrased`` answer (TOFU: the true answer in words the model was not trained on, the wrong ones in
  the same words) or, without that column, its answer. R << 1: the model prefers the true answer; R ~ 1: it cannot
  tell it from the wrong ones;
- ``forget_quality`` (with ``holdout``): the two-sample Kolmogorov-Smirnov p-value between the truth ratios on the
  forget set and on the holdout set. TOFU compares against a model retrained without the forget set; here the
  never-trained holdout rows of the same model play that part. High (-> 1): forget rows look like unseen rows;
- ``forget_quality_vs_retain_model`` (with ``reference_forget_ratios``, the truth ratios of a model trained on the
  retain set alone on the same forget rows): TOFU's forget quality, the KS p-value between the two models' forget
  truth ratios;
- ``mia_auc`` (with ``holdout``): loss-based membership inference, the ROC AUC of "lower loss = member" between
  forget rows (members) and holdout rows (non-members); 0.5: indistinguishable, 1: the forget set is memorised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from posttrain.trainers.wagle import collate, encode_row


@torch.no_grad()
def answer_stats(model, tokenizer, rows, batch_size=16, max_length=512, prompt_template="{prompt}", answers=None):
    """Per row: (token-mean CE of the answer, correct answer tokens, answer tokens). ``answers`` (one string per row)
    replaces the rows' completions, e.g. with perturbed answers."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_row(tokenizer, row, max_length, prompt_template, None if answers is None else answers[i])
               for i, row in enumerate(rows)]
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(encoded[start:start + batch_size], pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none") * valid
        correct = (logits.argmax(-1) == labels) & valid
        for i in range(labels.shape[0]):
            n = int(valid[i].sum())
            out.append((float(ce[i].sum()) / n, int(correct[i].sum()), n))
    return out


def truth_ratios(model, tokenizer, rows, **kwargs):
    """Per row R = mean_j exp(-CE(wrong_j)) / exp(-CE(true)) over the row's ``perturbed`` answers; ``true`` is the
    row's ``paraphrased`` answer if it has one, else its answer."""
    paraphrased = [r["paraphrased"] for r in rows] if "paraphrased" in rows[0] else None
    true = [s[0] for s in answer_stats(model, tokenizer, rows, answers=paraphrased, **kwargs)]
    width = len(rows[0]["perturbed"])
    wrong = [[] for _ in rows]
    for j in range(width):
        stats = answer_stats(model, tokenizer, rows, answers=[r["perturbed"][j] for r in rows], **kwargs)
        for i, s in enumerate(stats):
            wrong[i].append(s[0])
    return [sum(math.exp(t - w) for w in ws) / width for ws, t in zip(wrong, true)]


def auc(positive, negative):
    """ROC AUC of scores (positives should score higher): P(pos > neg) + P(pos == neg) / 2."""
    if not positive or not negative:
        raise ValueError("auc needs at least one score on each side")
    p, n = torch.tensor(positive, dtype=torch.float64)[:, None], torch.tensor(negative, dtype=torch.float64)[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def unlearning_metrics(model, tokenizer, forget, retain, world, holdout=None, batch_size=16, max_length=512,
                       prompt_template="{prompt}", reference_forget_ratios=None):
    """The module docstring's metrics; ``world`` or ``holdout`` may be None (their metrics are then left out)."""
    from scipy.stats import ks_2samp  # scipy comes with scikit-learn (alt-profanity-check's pinned dependency)

    was_training = model.training
    model.eval()
    kwargs = dict(batch_size=batch_size, max_length=max_length, prompt_template=prompt_template)
    results, ratios, losses = {}, {}, {}
    try:
        for name, data in (("forget", forget), ("retain", retain), ("world", world), ("holdout", holdout)):
            if data is None:
                continue
            rows = list(data)
            stats = answer_stats(model, tokenizer, rows, **kwargs)
            losses[name] = [s[0] for s in stats]
            results[f"{name}_loss"] = sum(losses[name]) / len(stats)
            results[f"{name}_acc"] = sum(s[1] for s in stats) / max(1, sum(s[2] for s in stats))
            if "perturbed" in rows[0]:
                ratios[name] = truth_ratios(model, tokenizer, rows, **kwargs)
                results[f"{name}_truth_ratio"] = sum(ratios[name]) / len(rows)
    finally:
        model.train(was_training)
    if reference_forget_ratios is not None and "forget" in ratios:
        results["forget_quality_vs_retain_model"] = float(ks_2samp(ratios["forget"], reference_forget_ratios).pvalue)
    if holdout is not None:
        results["mia_auc"] = auc([-x for x in losses["forget"]], [-x for x in losses["holdout"]])
        if "forget" in ratios and "holdout" in ratios:
            results["forget_quality"] = float(ks_2samp(ratios["forget"], ratios["holdout"]).pvalue)
    return results

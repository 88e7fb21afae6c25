"""Unlearning metrics as open-unlearning defines them: the pure math on worked examples, every metric of
``unlearning_metrics`` against a direct one-row-at-a-time computation on a few rows, and a model that memorised the
forget set is told apart from the holdout by every metric."""

import math
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig

from posttrain.data.generators import fictitious_authors
from posttrain.data.unlearning import collate, encode_row
from posttrain.evals.unlearning import answer_stats, truth_ratios, unlearning_metrics
from posttrain.recipes.models import load_tokenizer
from posttrain.recipes.tiny import tiny_model_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path("llama")
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(ModelConfig(model_name_or_path=str(path)))


@pytest.fixture(scope="module")
def data():
    return fictitious_authors(50, seed=1)  # 5 authors: forget10, holdout 1 author each


def test_pure_math_on_worked_examples():
    from posttrain.evals.unlearning import (
        auc,
        closer_to_1_better,
        harmonic_mean,
        mia_auc,
        min_k_plus_plus_score,
        min_k_score,
        privleak,
        rouge_l_recall,
        true_better,
        truth_ratio,
        zlib_score,
    )

    # truth ratio, geometric: exp(-mean wrong loss) / exp(-true loss); losses 1 and 3 -> mean 2 -> e^(1-2)
    assert truth_ratio(1.0, [1.0, 3.0]) == pytest.approx(math.exp(-1))
    assert truth_ratio(1.0, [1.0, 3.0]) != pytest.approx((math.exp(0) + math.exp(-2)) / 2)  # not the arithmetic mean
    assert closer_to_1_better([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3, rel=1e-8)
    assert true_better([0.25, 2.0]) == pytest.approx((0.75 + 0.0) / 2)
    # min-k: k=0.4 of 5 tokens -> the 2 lowest
    assert min_k_score([-1.0, -5.0, -2.0, -0.5, -4.0], 0.4) == pytest.approx(4.5)
    assert min_k_score([-3.0], 0.4) == pytest.approx(3.0)  # at least one token
    # min-k++: z = (lp - mu) / sigma; z = (-2-0)/1, (-1-(-3))/2 = 1, (0-1)/0.5 = -2 -> k=0.4 of 3 -> 1 lowest -> 2
    assert min_k_plus_plus_score([-2.0, -1.0, 0.0], [0.0, -3.0, 1.0], [1.0, 4.0, 0.25], 0.4) == pytest.approx(2.0)
    text = "The author was born in Paris."
    assert zlib_score(2.0, text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))
    assert mia_auc([1.0, 2.0], [3.0]) == 1.0 and mia_auc([3.0], [1.0, 2.0]) == 0.0
    assert mia_auc([1.0, 3.0], [2.0]) == 0.5 and mia_auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        mia_auc([], [1.0])
    assert auc([3.0, 2.0], [1.0]) == 1.0 and auc([1.0], [3.0, 2.0]) == 0.0 and auc([1.0, 3.0], [2.0]) == 0.5
    assert privleak(0.5) == pytest.approx(0.0, abs=1e-6) and privleak(1.0) == pytest.approx(-100.0)
    assert privleak(0.9, reference_auc=0.6) == pytest.approx((0.1 - 0.4) / 0.4 * 100)
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    # ROUGE-L recall: LCS("the cat sat on the mat", "the cat on mat") = 4 of the reference's 6 tokens; stemmed
    assert rouge_l_recall(["the cat on mat", "cats sitting"], ["the cat sat on the mat", "cat sits"]) == pytest.approx(
        [4 / 6, 1.0]
    )


def _direct(model, tok, row, answer=None):
    """One row alone, no padding: (token-mean CE, per-row accuracy, answer log-probs but EOS, their mu, sigma2,
    answer text)."""
    batch = collate([encode_row(tok, row, answer=answer)], tok.pad_token_id)
    out = model(**batch)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    labels = batch["labels"][0, 1:]
    pos = [i for i in range(len(labels)) if labels[i] != -100]
    lps = [float(logp[i, labels[i]]) for i in pos]
    acc = sum(int(logp[i].argmax() == labels[i]) for i in pos) / len(pos)
    mu = [float((logp[i].exp() * logp[i]).sum()) for i in pos[:-1]]
    s2 = [float((logp[i].exp() * logp[i] ** 2).sum()) - m * m for i, m in zip(pos[:-1], mu)]
    text = tok.decode([int(labels[i]) for i in pos], skip_special_tokens=True).strip()
    assert out.loss.item() == pytest.approx(-sum(lps) / len(lps), rel=1e-5)  # HF's own loss
    return out.loss.item(), acc, lps[:-1], mu, s2, text


@pytest.fixture(scope="module")
def half_trained(tiny, data):
    """The tiny model after a few steps on the retain / world rows the next test scores and on half its forget
    rows: some answer tokens right, some not, greedy answers that overlap the true ones (a random model's are
    empty), forget rows not all told apart from the holdout."""
    tok = tiny[1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"))
    rows = list(data["forget10"])[:2] + list(data["retain"])[:3] + list(data["world_facts"])[:3]
    batch = collate([encode_row(tok, r) for r in rows], tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tok


STEPS = 40


@torch.no_grad()
def test_every_metric_equals_a_direct_computation(half_trained, data):
    model, tok = half_trained
    forget, holdout = list(data["forget10"])[:4], list(data["holdout"])[:3]
    retain, world = list(data["retain"])[:3], list(data["world_facts"])[:3]
    out = unlearning_metrics(model, tok, forget, retain, world, holdout, batch_size=2, max_new_tokens=12)
    direct = {
        name: [_direct(model, tok, r) for r in rows]
        for name, rows in (("forget", forget), ("retain", retain), ("world", world), ("holdout", holdout))
    }
    ratios = {}
    for name, rows in (("forget", forget), ("retain", retain), ("world", world), ("holdout", holdout)):
        true = [_direct(model, tok, r, r["paraphrased"])[0] for r in rows]
        wrong = [[_direct(model, tok, r, p)[0] for p in r["perturbed"]] for r in rows]
        ratios[name] = [math.exp(-sum(w) / len(w)) / (math.exp(-t) + 1e-10) for t, w in zip(true, wrong)]
        if name == "world":
            probs = [math.exp(-d[0]) for d in direct[name]]
            normalised = [p / (p + sum(math.exp(-x) for x in w)) for p, w in zip(probs, wrong)]
    prefix = {"forget": "forget", "retain": "retain", "world": "wf", "holdout": "holdout"}
    for name, rows in direct.items():
        assert out[f"{name}_loss"] == pytest.approx(sum(d[0] for d in rows) / len(rows), rel=1e-5)
        assert out[f"{name}_acc"] == pytest.approx(sum(d[1] for d in rows) / len(rows))  # a per-row mean
        assert out[f"{prefix[name]}_Q_A_Prob"] == pytest.approx(
            sum(math.exp(-d[0]) for d in rows) / len(rows), rel=1e-5
        )
    assert out["forget_truth_ratio"] == pytest.approx(sum(min(r, 1 / r) for r in ratios["forget"]) / 4, rel=1e-4)
    assert out["holdout_truth_ratio"] == pytest.approx(sum(min(r, 1 / r) for r in ratios["holdout"]) / 3, rel=1e-4)
    assert out["retain_Truth_Ratio"] == pytest.approx(
        sum(max(0, 1 - r) for r in ratios["retain"]) / 3, rel=1e-4, abs=1e-6
    )
    assert out["wf_Truth_Ratio"] == pytest.approx(sum(max(0, 1 - r) for r in ratios["world"]) / 3, rel=1e-4, abs=1e-6)
    assert out["wf_Q_A_Prob_normalised"] == pytest.approx(sum(normalised) / 3, rel=1e-5)
    # ROUGE-L recall of the greedy answers, generated here one row at a time (no padding)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = {}
    for name, rows in (("forget", forget), ("retain", retain), ("world", world)):
        values = []
        for r in rows:
            ids = tok.apply_chat_template(
                r["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            values.append(scorer.score(r["completion"][0]["content"], text)["rougeL"].recall)
        rouge[name] = sum(values) / len(values)
        assert out[f"{prefix[name]}_Q_A_ROUGE"] == pytest.approx(rouge[name])
    parts = [
        out["retain_Q_A_Prob"],
        rouge["retain"],
        out["retain_Truth_Ratio"],
        out["wf_Q_A_Prob_normalised"],
        rouge["world"],
        out["wf_Truth_Ratio"],
    ]
    assert min(parts) > 0 and 0 < out["forget_acc"] < 1  # nothing here is trivially 0 or 1
    assert out["model_utility"] == pytest.approx(len(parts) / sum(1 / p for p in parts), rel=1e-6)

    # membership attacks: pairwise AUC by hand, forget rows (members) scoring below holdout rows
    def pairwise(f, h):
        return sum((a < b) + 0.5 * (a == b) for a in f for b in h) / (len(f) * len(h))

    def scores(rows, attack):
        if attack == "loss":
            return [d[0] for d in rows]
        if attack == "zlib":
            return [d[0] / len(zlib.compress(d[5].encode())) for d in rows]
        if attack == "min_k":
            return [-sum(sorted(d[2])[: max(1, int(0.4 * len(d[2])))]) / max(1, int(0.4 * len(d[2]))) for d in rows]
        z = [sorted((lp - m) / math.sqrt(max(s, 1e-6)) for lp, m, s in zip(d[2], d[3], d[4])) for d in rows]
        return [-sum(v[: max(1, int(0.4 * len(v)))]) / max(1, int(0.4 * len(v))) for v in z]

    from posttrain.evals.unlearning import attack_scores, row_stats

    per_row = {
        name: attack_scores(row_stats(model, tok, rows, batch_size=2))
        for name, rows in (("forget", forget), ("holdout", holdout))
    }
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        f, h = scores(direct["forget"], attack), scores(direct["holdout"], attack)
        assert per_row["forget"][f"mia_{attack}"] == pytest.approx(f, rel=1e-4), attack
        assert per_row["holdout"][f"mia_{attack}"] == pytest.approx(h, rel=1e-4), attack
        assert out[f"mia_{attack}"] == pytest.approx(pairwise(f, h)), attack
    assert 0 < out["mia_min_k"] < 1  # not a trivial split
    assert out["privleak"] == pytest.approx((1 - out["mia_min_k"] - 0.5) / 0.5 * 100, abs=1e-6)
    from scipy.stats import ks_2samp

    assert out["forget_quality"] == pytest.approx(ks_2samp(ratios["forget"], ratios["holdout"]).pvalue, rel=1e-6)


@torch.no_grad()
def test_truth_ratio_is_the_geometric_form(half_trained, data):
    # TOFU / open-unlearning: exp(-mean_j L(wrong_j)) / exp(-L(true)), not the mean of the per-answer ratios
    model, tok = half_trained
    rows = list(data["forget10"])[:4]
    true = [_direct(model, tok, r, r["paraphrased"])[0] for r in rows]
    wrong = [[_direct(model, tok, r, p)[0] for p in r["perturbed"]] for r in rows]
    geometric = [math.exp(t - sum(w) / len(w)) for t, w in zip(true, wrong)]
    arithmetic = [sum(math.exp(t - x) for x in w) / len(w) for t, w in zip(true, wrong)]
    assert min(a / g for a, g in zip(arithmetic, geometric)) > 1.005  # 1.4% apart here, the check 1e-5
    assert truth_ratios(model, tok, rows) == pytest.approx(geometric, rel=1e-5)


@torch.no_grad()
def test_token_accuracy_is_a_per_row_mean(half_trained, data):
    model, tok = half_trained
    rows = list(data["forget10"])[:4] + list(data["world_facts"])[:3]  # answers of different lengths
    direct = [_direct(model, tok, r) for r in rows]
    stats = answer_stats(model, tok, rows)
    pooled = sum(c for _, c, _ in stats) / sum(n for _, _, n in stats)
    per_row = sum(d[1] for d in direct) / len(rows)
    assert abs(per_row - pooled) > 0.002  # 0.68 vs 0.676 here; the check is to 1e-6
    assert unlearning_metrics(model, tok, rows, None, None)["forget_acc"] == pytest.approx(per_row)


def test_row_loss_is_hf_loss_and_truth_ratio_of_the_answer_itself_is_one(tiny, data):
    model, tok = tiny
    rows = list(data["forget10"])[:3]
    stats = answer_stats(model, tok, rows, batch_size=2)
    for row, (ce, correct, n) in zip(rows, stats):
        batch = collate([encode_row(tok, row)], tok.pad_token_id)
        assert ce == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        assert n == int((batch["labels"][:, 1:] != -100).sum()) and 0 <= correct <= n
    same = [{**r, "perturbed": [r["paraphrased"]] * 2} for r in rows]  # R compares with the paraphrased answer
    assert truth_ratios(model, tok, same) == pytest.approx([1.0] * 3, rel=1e-5)
    unparaphrased = [{k: v for k, v in r.items() if k != "paraphrased"} for r in rows]  # else with the answer
    same = [{**r, "perturbed": [r["completion"][0]["content"]] * 2} for r in unparaphrased]
    assert truth_ratios(model, tok, same) == pytest.approx([1.0] * 3, rel=1e-5)


def test_a_model_that_memorised_the_forget_set_is_caught(tiny, data):
    tok = tiny[1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")).train()  # a fresh copy to train
    kwargs = dict(max_new_tokens=4)
    before = unlearning_metrics(
        model, tok, data["forget10"], data["retain"], data["world_facts"], data["holdout"], **kwargs
    )
    untrained = truth_ratios(model, tok, list(data["forget10"]))  # stands in for a model that never saw the forget set
    batch = collate([encode_row(tok, r) for r in data["forget10"]], tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = unlearning_metrics(
        model, tok, data["forget10"], data["retain"], None, data["holdout"], reference_forget_ratios=untrained, **kwargs
    )
    assert model.training  # the mode is restored
    assert set(before) >= {
        "forget_loss",
        "forget_acc",
        "wf_Q_A_Prob",
        "forget_truth_ratio",
        "mia_min_k",
        "privleak",
        "forget_quality",
        "model_utility",
        "forget_Q_A_ROUGE",
        "wf_Truth_Ratio",
    }
    assert "world_loss" not in after and "model_utility" not in after  # no world facts: no utility
    assert after["forget_loss"] < 0.5 * before["forget_loss"] and after["forget_acc"] > 0.8 > after["holdout_acc"]
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert after[f"mia_{attack}"] == 1.0, attack  # every forget row looks seen, every holdout row unseen
    assert after["privleak"] == pytest.approx(-100.0) and abs(before["privleak"]) < 60
    assert after["forget_Q_A_Prob"] > 0.5 > before["forget_Q_A_Prob"]
    assert after["forget_quality"] < 0.01 < before["forget_quality"]  # truth ratios of forget and holdout now differ
    assert after["forget_quality_vs_retain_model"] < 0.01 and "forget_quality_vs_retain_model" not in before


def test_a_bad_generation_length_is_refused_before_any_model_loads():
    from posttrain import UserError
    from posttrain.evals.harness import parse_tasks

    with pytest.raises(UserError, match="max_new_tokens must be >= 1"):
        parse_tasks({"unlearning": {"max_new_tokens": 0}})

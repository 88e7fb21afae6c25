"""Unlearning metrics: AUC and truth ratio by hand, the per-row CE is HF's loss, and a model that memorised the
forget set is told apart from the holdout by every metric."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig

from posttrain.data.generators import fictitious_authors
from posttrain.evals.unlearning import answer_stats, auc, truth_ratios, unlearning_metrics
from posttrain.recipes.models import load_tokenizer
from posttrain.recipes.tiny import tiny_model_path
from posttrain.trainers.wagle import collate, encode_row

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path("llama")
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(ModelConfig(model_name_or_path=str(path)))


@pytest.fixture(scope="module")
def data():
    return fictitious_authors(50, seed=1)  # 5 authors: forget10, holdout 1 author each


def test_auc_by_hand():
    assert auc([3.0, 2.0], [1.0]) == 1.0 and auc([1.0], [3.0, 2.0]) == 0.0
    assert auc([1.0, 3.0], [2.0]) == 0.5 and auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        auc([], [1.0])


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
    before = unlearning_metrics(model, tok, data["forget10"], data["retain"], data["world_facts"], data["holdout"])
    untrained = truth_ratios(model, tok, list(data["forget10"]))  # stands in for a model that never saw the forget set
    batch = collate([encode_row(tok, r) for r in data["forget10"]], tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = unlearning_metrics(model, tok, data["forget10"], data["retain"], None, data["holdout"],
                               reference_forget_ratios=untrained)
    assert model.training  # the mode is restored
    assert set(before) >= {"forget_loss", "forget_acc", "world_acc", "forget_truth_ratio", "mia_auc", "forget_quality"}
    assert "world_loss" not in after
    assert after["forget_loss"] < 0.5 * before["forget_loss"] and after["forget_acc"] > 0.8 > after["holdout_acc"]
    # trained on the answers' own words, the model still prefers the true fact in other words (measured: 0.28 vs 1.23)
    assert after["mia_auc"] == 1.0 and after["forget_truth_ratio"] < 0.4 * after["holdout_truth_ratio"]
    assert after["forget_quality"] < 0.01 < before["forget_quality"]  # truth ratios of forget and holdout now differ
    assert after["forget_quality_vs_retain_model"] < 0.01 and "forget_quality_vs_retain_model" not in before

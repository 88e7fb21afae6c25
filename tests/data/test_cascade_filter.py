"""Deep Ignorance cascade filter (data/cascade_filter.py): the pure pieces on worked examples and random inputs, the
cascade property, the paper's strong/weak experiment on a generated benign corpus with its pass criteria, the recipe
path (a tiny SFT run sees only the kept and replaced rows) and ``posttrain filter``."""

import json
import random

import pytest
from datasets import Dataset

from posttrain import UserError
from posttrain.data.cascade_filter import (
    BlocklistStage,
    CascadeFilter,
    ClassifierStage,
    JudgeStage,
    blocklist_hits,
    chunk_words,
    classification_report,
    document_text,
    mine_blocklist,
    parse_judgment,
    replacement_rows,
    select_keywords,
)
from posttrain.data.generators import topic_corpus
from posttrain.recipes.config import load_recipe

# --------------------------------------------------------------------------------------------------- pure pieces


def test_blocklist_hits_counts_distinct_keywords_case_insensitively_and_stops_at_the_threshold():
    keywords = ["lava", "magma", "crater", "tephra"]
    # substring match, any case: "Lavatory" holds "lava"; a keyword found twice counts once
    assert blocklist_hits("The LAVATORY had lava lamps.", keywords, 2) == ["lava"]
    # stops at the threshold: tephra is present but never reached
    assert blocklist_hits("magma, crater, tephra and lava", keywords, 2) == ["lava", "magma"]
    assert blocklist_hits("magma, crater, tephra and lava", keywords, 3) == ["lava", "magma", "crater"]
    assert blocklist_hits("nothing here", keywords, 2) == []
    stage = BlocklistStage(keywords, min_hits=2)
    assert stage.judge(["Lava and MAGMA", "only lava", ""]) == [
        (True, {"keywords": "lava, magma"}),
        (False, {"keywords": "lava"}),
        (False, {"keywords": ""}),
    ]


def test_select_keywords_keeps_pos_ratio_strictly_above_the_threshold_and_relevant_only():
    rows = [
        {"keyword": "lava", "pos_ratio": 0.9},
        {"keyword": "edge", "pos_ratio": 0.4},
        {"keyword": "above", "pos_ratio": 0.41},
        {"keyword": "curated_out", "pos_ratio": 0.95, "is_relevant": False},
        {"keyword": "magma", "pos_ratio": 0.5, "is_relevant": True},
    ]
    assert select_keywords(rows, 0.4) == ["above", "lava", "magma"]


def test_mine_blocklist_measures_pos_ratio_per_document():
    texts = ["Lava lava flows", "lava cake", "magma and lava", "cake shop", "magma rises"]
    labels = [True, False, True, False, True]
    mined = {r["keyword"]: r for r in mine_blocklist(texts, labels, min_docs=2)}
    # lava: in documents 0, 1, 2 (positive 0 and 2) -> 2/3; magma: in 2 and 4, both positive -> 1.0
    assert set(mined) == {"lava", "magma"}  # 'flows', 'rises' are in one positive document only; 'cake' in none
    assert mined["lava"]["pos_ratio"] == pytest.approx(2 / 3) and mined["lava"]["count"] == 3
    assert mined["magma"]["pos_ratio"] == 1.0


def test_chunk_words_and_document_text():
    assert chunk_words("a b c d e", 2) == ["a b", "c d", "e"]
    assert chunk_words("", 8) == [""]
    row = {
        "prompt": [{"role": "user", "content": "Why?"}],
        "completion": [{"role": "assistant", "content": "Lava."}],
        "score": 3,
    }
    assert document_text(row) == "Why?\nLava."
    assert document_text({"body": "x", "text": "y"}, "body") == "x"


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("[1]", True),
        ("Answer: [0]", False),
        ("first [1], final [0]", False),
        ("first [0] then [ 1 ]", True),
        ("[0] but 1 later", False),
        ("Rating [7]", False),
    ],
)
def test_parse_judgment_reads_the_first_digit_after_the_last_bracket(completion, expected):
    assert parse_judgment(completion) is expected


def test_parse_judgment_without_a_digit_raises_and_the_judge_then_filters():
    with pytest.raises(ValueError):
        parse_judgment("[yes]")

    def judge(text):
        if "boom" in text:
            raise RuntimeError("endpoint down")
        return "[0]" if "fine" in text else "I think [1]"

    verdicts = JudgeStage(judge).judge(["fine text", "bad text", "boom", "no digit"])
    assert [v for v, _ in verdicts] == [False, True, True, True]  # an error or an unparsable answer filters
    assert verdicts[2][1]["error"].startswith("RuntimeError") and verdicts[1][1]["completion"] == "I think [1]"


def test_classification_report_worked_example():
    y_true = [True, True, True, False, False, False, False, False]
    y_pred = [True, True, False, True, True, False, False, False]
    r = classification_report(y_true, y_pred)
    assert (r["tn"], r["fp"], r["fn"], r["tp"]) == (3, 2, 1, 2)
    assert r["precision"] == pytest.approx(2 / 4) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["fpr"] == pytest.approx(2 / 5) and r["accuracy"] == pytest.approx(5 / 8)
    assert r["filtered_documents"] == 4 and r["percent_filtered"] == pytest.approx(50.0)
    assert set(classification_report(None, y_pred)) == {"documents", "filtered_documents", "percent_filtered"}


def test_classification_report_on_random_labels_matches_the_definitions():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(5, 60)
        y_true = [rng.random() < 0.3 for _ in range(n)]
        y_pred = [rng.random() < 0.4 for _ in range(n)]
        tp = sum(t and p for t, p in zip(y_true, y_pred))
        fp = sum(p and not t for t, p in zip(y_true, y_pred))
        fn = sum(t and not p for t, p in zip(y_true, y_pred))
        tn = n - tp - fp - fn
        r = classification_report(y_true, y_pred)
        assert (r["tn"], r["fp"], r["fn"], r["tp"]) == (tn, fp, fn, tp)
        assert r["fpr"] == pytest.approx(fp / (fp + tn) if fp + tn else 0.0)
        assert r["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)
        assert r["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)


def test_replacement_rows_draw_as_many_approved_rows_as_were_filtered():
    rng = random.Random(1)
    for _ in range(20):
        approved = sorted(rng.sample(range(1000), rng.randint(0, 60)))
        filtered = rng.sample(range(1000, 2000), rng.randint(0, 60))
        rows = replacement_rows(filtered, approved, seed=rng.randint(0, 9))
        assert len(set(rows)) == len(rows) and set(rows) <= set(approved)
        assert len(rows) == min(len(filtered), len(approved))
    assert replacement_rows([5, 6], [1, 2, 3, 4], seed=0) == replacement_rows([5, 6], [1, 2, 3, 4], seed=0)


def test_the_classifier_stage_fails_closed():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    unfitted = ClassifierStage(make_pipeline(TfidfVectorizer(), LogisticRegression()))  # scoring raises
    verdicts = unfitted.judge(["a document", "another"])
    assert [v for v, _ in verdicts] == [True, True] and "error" in verdicts[0][1]


# ----------------------------------------------------------------------------------------------------- cascade


class _CountingModel:
    """A real scikit-learn-like scorer (keyword share) that records what it scores, for the cascade property."""

    classes_ = [False, True]

    def __init__(self):
        self.seen = []

    def predict_proba(self, texts):
        import numpy as np

        self.seen += list(texts)
        p = np.array([0.9 if "eruption" in t else 0.1 for t in texts])
        return np.stack([1 - p, p], axis=1)


def test_each_stage_judges_only_what_the_previous_stage_flagged_and_writes_the_official_columns():
    texts = ["lava and magma eruption", "lava and magma cake", "only lava", "nothing", "magma lava eruption"]
    data = Dataset.from_dict({"text": texts, "is_filter_target": [True, False, False, False, True]})
    model = _CountingModel()
    judged_by_lm = []

    def judge(text):
        judged_by_lm.append(text)
        return "[0]" if text.startswith("magma") else "[1]"

    out = CascadeFilter(
        [BlocklistStage(["lava", "magma"]), ClassifierStage(model), JudgeStage(judge)], "weak", keep_size=True
    ).apply(data)
    assert model.seen == [texts[0], texts[1], texts[4]]  # escalated by the blocklist only
    assert judged_by_lm == [texts[0], texts[4]]  # flagged by the classifier only
    a = out.annotated
    assert a["word_filter"] == [True, True, False, False, True]
    assert a["bert_filter"] == [True, False, False, False, True]
    assert a["lm_filter"] == [True, False, False, False, False]
    assert a["combined_filter"] == a["lm_filter"] and a["id"] == [0, 1, 2, 3, 4]
    assert a["bert_filter_metadata"][2] == {"highest_score": 0.0, "lowest_score": 0.0, "mean_score": 0.0, "error": ""}
    assert a["bert_filter_metadata"][0]["highest_score"] == pytest.approx(0.9)
    assert a["word_filter_metadata"][0] == {"keywords": "lava, magma"}
    stages = out.report["stages"]
    assert [stages[s]["judged"] for s in ("word_filter", "bert_filter", "lm_filter")] == [5, 3, 2]
    # one filtered (row 0), replaced by one of the approved escalations (rows 1 and 4): size kept
    assert out.report["filtered"] == 1 and out.report["replaced"] == 1 and len(out.dataset) == 5
    assert out.dataset["text"][:4] == texts[1:] and out.dataset["text"][4] in (texts[1], texts[4])
    strong = CascadeFilter([BlocklistStage(["lava", "magma"]), ClassifierStage(_CountingModel())], "strong").apply(data)
    assert strong.dataset["text"] == ["only lava", "nothing"] and strong.report["replaced"] == 0
    assert list(strong.report["stages"]) == ["word_filter", "combined_filter"]


def test_the_classifier_scores_every_chunk_and_flags_when_any_chunk_is_above_the_threshold():
    model = _CountingModel()
    stage = ClassifierStage(model, threshold=0.5, context_length=3)
    verdicts = stage.judge(["calm quiet day then an eruption", "calm quiet day"])
    assert model.seen == ["calm quiet day", "then an eruption", "calm quiet day"]  # 3-word chunks
    assert verdicts[0][0] is True and verdicts[1][0] is False
    assert verdicts[0][1]["highest_score"] == pytest.approx(0.9) and verdicts[0][1]["lowest_score"] == pytest.approx(
        0.1
    )
    assert verdicts[0][1]["mean_score"] == pytest.approx(0.5) and stage.calls == 2
    assert ClassifierStage(_CountingModel(), threshold=0.9).judge(["eruption"])[0][0] is False  # strictly above


def test_without_enough_approved_documents_all_are_added_and_the_shortfall_is_reported():
    texts = ["lava magma eruption", "magma lava eruption again", "lava magma cake", "plain"]
    data = Dataset.from_dict({"text": texts})
    out = CascadeFilter([BlocklistStage(["lava", "magma"]), ClassifierStage(_CountingModel())], "weak").apply(data)
    assert out.report["filtered"] == 2 and out.report["approved_escalations"] == 1
    assert out.report["replaced"] == 1 and out.report["shortfall"] == 1 and len(out.dataset) == 3
    assert out.dataset["text"] == ["lava magma cake", "plain", "lava magma cake"]
    assert out.report["labels"] is False and "recall" not in out.report["stages"]["combined_filter"]
    off = CascadeFilter(
        [BlocklistStage(["lava", "magma"]), ClassifierStage(_CountingModel())], "weak", keep_size=False
    ).apply(data)
    assert off.dataset["text"] == ["lava magma cake", "plain"] and off.report["shortfall"] is None


def test_the_paper_experiment_weak_filter_keeps_recall_and_halves_the_false_positives():
    """The Deep Ignorance strong/weak comparison on a generated benign corpus (volcanology as the stand-in target,
    near misses sharing its words, unrelated documents). Pass criteria: FPR(weak) <= 0.5 FPR(strong); recall(weak)
    >= 0.9 recall(strong); classifier invocations = escalated documents; |D_out| = |D_in| when enough approved
    escalations exist."""
    corpus = topic_corpus(2000, seed=0)
    labelled, data = corpus["labelled"], corpus["train"]
    keywords = select_keywords(mine_blocklist(labelled["text"], labelled["is_filter_target"], min_docs=5), 0.4)
    classifier = ClassifierStage.train(labelled["text"], labelled["is_filter_target"], seed=0)
    weak = CascadeFilter([BlocklistStage(keywords, 2), classifier], "weak").apply(data)
    strong = CascadeFilter([BlocklistStage(keywords, 2), classifier], "strong").apply(data)
    s, w = strong.report["stages"]["combined_filter"], weak.report["stages"]["combined_filter"]
    escalated = weak.report["stages"]["word_filter"]["filtered_documents"]
    assert classifier.calls == escalated == weak.report["stages"]["bert_filter"]["judged"]  # strong ran no classifier
    assert s["fpr"] > 0.05, "the near misses must fool the blocklist, or the comparison is empty"
    assert w["fpr"] <= 0.5 * s["fpr"], (w["fpr"], s["fpr"])
    assert w["recall"] >= 0.9 * s["recall"], (w["recall"], s["recall"])
    assert weak.report["approved_escalations"] >= weak.report["filtered"]
    assert len(weak.dataset) == len(data) and weak.report["shortfall"] == 0
    assert len(strong.dataset) == len(data) - s["filtered_documents"]  # strong: nothing approved, nothing to add
    filtered_texts = {t for t, f in zip(data["text"], weak.annotated["combined_filter"]) if f}
    assert not filtered_texts & set(weak.dataset["text"])


# -------------------------------------------------------------------------------------------- recipes and CLI


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data_filter_treshold": 0.3}, "unknown key 'data_filter_treshold'.*did you mean 'data_filter_threshold'"),
        ({"data_filter": "medium"}, "data_filter must be strong or weak"),
        ({"data_filter_labelled": None}, "data_filter_labelled must name a labelled set"),
        ({"data_filter": "strong", "data_filter_judge": "json:loads"}, "judge is a stage of the weak filter"),
        ({"data_filter_judge": "no_such_module:fn"}, "cannot be imported"),
        ({"data_filter_threshold": 1.5}, r"data_filter_threshold must be in \[0, 1\)"),
        ({"data_filter_blocklist": "/no/such/keywords.csv"}, "file not found"),
    ],
)
def test_bad_filter_keys_are_one_recipe_error(overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe("cascade_filter/tiny", overrides)


def test_filter_keys_need_data_filter_and_an_llm_method_with_training_data():
    with pytest.raises(UserError, match="data_filter_min_hits set but no data_filter"):
        load_recipe("sft/tiny", {"data_filter_min_hits": 3})
    with pytest.raises(UserError, match="method 'fedau' has no training data"):
        load_recipe("fedau/quadratic_fedau", {"data_filter": "weak"})
    with pytest.raises(UserError, match="forget set on purpose"):
        load_recipe("wagle/tiny", {"data_filter": "weak", "data_filter_labelled": "builtin:topic_corpus"})


def test_an_official_keyword_csv_and_a_judge_module_drive_the_filter_of_a_preference_recipe(tmp_path, monkeypatch):
    """Any task: DPO's preference pairs, filtered before formatting with a curated CSV (strong) and, in weak mode, a
    judge imported from the recipe's module path."""
    from posttrain.data import load_task_datasets
    from posttrain.data.generators import preference_pairs

    rows = preference_pairs(64, 0)
    texts = [document_text(r) for r in rows]
    csv = tmp_path / "keywords.csv"
    csv.write_text("keyword,pos_ratio,is_relevant\nquestion,0.9,true\nthat,0.8,true\nthe,0.95,false\nwhat,0.1,true\n")
    expected = [t for t in texts if len(blocklist_hits(t, ["question", "that"], 2)) < 2]
    assert 0 < len(expected) < len(texts)
    recipe = load_recipe("dpo/tiny", {"num_samples": 64, "data_filter": "strong", "data_filter_blocklist": str(csv)})
    train = load_task_datasets("preference", recipe.data_args, recipe.data_filter)["train"]
    assert sorted(document_text(r) for r in train) == sorted(expected)
    assert train.column_names == ["prompt", "chosen", "rejected"]  # formatted after filtering

    (tmp_path / "my_judge.py").write_text("def judge(text):\n    return '[0]' if 'Juliet' in text else '[1]'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(
        "dpo/tiny",
        {
            "num_samples": 64,
            "data_filter": "weak",
            "data_filter_blocklist": str(csv),
            "data_filter_labelled": "builtin:topic_corpus",
            "data_filter_labelled_split": "labelled",
            "data_filter_threshold": 0.0,
            "data_filter_judge": "my_judge:judge",
            "data_filter_keep_size": False,
        },
    )
    train = load_task_datasets("preference", recipe.data_args, recipe.data_filter, report_dir=str(tmp_path))["train"]
    report = json.loads((tmp_path / "data_filter_report.json").read_text())
    # threshold 0: the classifier flags every escalation, so the judge decides
    assert report["stages"]["bert_filter"]["filtered_documents"] == len(texts) - len(expected)
    assert report["stages"]["lm_filter"]["judged"] == len(texts) - len(expected)
    judged_out = [t for t in texts if t not in expected and "Juliet" not in t]
    assert 0 < len(judged_out) < len(texts) - len(expected)
    assert len(train) == len(texts) - len(judged_out) and report["settings"]["data_filter_judge"] == "my_judge:judge"


def test_posttrain_list_shows_the_data_stage(capsys):
    from posttrain.cli import main

    assert main(["list", "methods"]) == 0
    assert "data_filter" in capsys.readouterr().out
    assert main(["list", "recipes"]) == 0
    assert "cascade_filter/tiny" in capsys.readouterr().out


def test_a_tiny_sft_run_trains_on_the_kept_and_replaced_rows_only(tmp_path):
    from posttrain.recipes.train import build_trainer

    recipe = load_recipe(
        "cascade_filter/tiny", {"num_samples": 300, "max_steps": 1, "max_length": 1024, "output_dir": str(tmp_path)}
    )
    trainer = build_trainer(recipe)
    report = json.loads((tmp_path / "data_filter_report.json").read_text())
    corpus = topic_corpus(300, seed=0)
    texts, labels = corpus["labelled"]["text"], corpus["labelled"]["is_filter_target"]
    keywords = select_keywords(mine_blocklist(texts, labels, min_docs=5), 0.4)
    expected = CascadeFilter(
        [BlocklistStage(keywords, 2), ClassifierStage.train(texts, labels)], "weak", keep_size=True
    ).apply(corpus["train"])
    tokenizer = trainer.processing_class
    seen = sorted(tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in trainer.train_dataset["input_ids"])
    assert report["filtered"] > 0 and report["replaced"] == report["filtered"]
    assert seen == sorted(expected.dataset["text"])
    filtered = {t for t, f in zip(corpus["train"]["text"], expected.annotated["combined_filter"]) if f}
    assert filtered and not filtered & set(seen)
    trainer.train()
    assert trainer.state.global_step == 1


def test_posttrain_filter_writes_the_rows_and_the_report_and_never_overwrites_silently(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "filtered"
    args = ["filter", "cascade_filter/tiny_strong", "--output", str(out), "--num_samples", "300"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert report["mode"] == "strong" and len(rows) == report["output_documents"] == 300 - report["filtered"]
    assert {"id", "word_filter", "word_filter_metadata", "combined_filter"} <= set(judgments[0]) and len(
        judgments
    ) == 300
    assert {r["text"] for r in rows} == {j["text"] for j in judgments if not j["combined_filter"]}
    assert (out / "report.png").stat().st_size > 0 and "| word_filter |" in (out / "report.md").read_text()
    assert "data_filter strong: 300 documents" in capsys.readouterr().out

    (out / "marker").write_text("mine")
    assert main(args) == 2  # exists: refused, untouched
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1 and (out / "marker").exists()
    assert main(args + ["--overwrite", "--data_filter", "weak"]) == 0
    assert not (out / "marker").exists() and json.loads((out / "report.json").read_text())["mode"] == "weak"
    assert [p.name for p in tmp_path.iterdir()] == ["filtered"]  # no temporary folder left behind
    assert main(["filter", "sft/tiny", "--output", str(tmp_path / "x")]) == 2
    assert "no data_filter key" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a bad key stops `train` and `filter` alike with one line, before any data or model loads
    for command in ("train", "filter"):
        assert (
            main([command, "cascade_filter/tiny", "--data_filter_min_hits", "0", "--output_dir", str(tmp_path / "y")])
            == 2
        )
        err = capsys.readouterr().err
        assert "data_filter_min_hits must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()

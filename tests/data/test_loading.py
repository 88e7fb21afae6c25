"""Loading and per-task checks: sources, formats, and every error a user can hit (one line, with the row)."""

import dataclasses
import json
import time

import datasets
import pytest
from datasets import Dataset

from posttrain import UserError
from posttrain.data import DATA_TASKS, GENERATORS, DataArguments, DataError, load_source, load_task_datasets
from posttrain.data.loading import EVAL_SEED_OFFSET, format_for_task


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # datasets caches every file it reads; keep that out of the user's ~/.cache and apart between tests.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _raises(match, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    return message


def _msg(role, content):
    return [{"role": role, "content": content}]


PAIRS = [
    {"prompt": "What is 1 + 1?", "chosen": "It is 2.", "rejected": "It is 3."},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
]

# ----------------------------------------------------------------------------------------------- sources


def test_load_source_builtin_and_splits():
    assert len(load_source("builtin:arithmetic", num_samples=12, seed=1, difficulty=2)) == 12
    assert set(load_source("builtin:arithmetic", num_samples=12, difficulty=2)["difficulty"]) == {2}
    assert set(load_source("builtin:fictitious_facts", split="forget", num_samples=40)["entity"])
    _raises("has one split, 'train', not 'test'", load_source, "builtin:arithmetic", split="test")
    _raises(r"splits \['forget', 'retain'\], not 'train'", load_source, "builtin:fictitious_facts")
    _raises("difficulty only applies", load_source, "builtin:preference_pairs", difficulty=2)
    _raises("dataset_config", load_source, "builtin:arithmetic", config="main")


def test_unknown_builtin_lists_valid_ones():
    message = _raises("unknown builtin generator 'nope'", load_source, "builtin:nope")
    assert all(f"builtin:{name}" in message for name in GENERATORS)


@pytest.mark.parametrize("extension", ["jsonl", "json", "csv", "parquet"])
def test_local_files_round_trip(tmp_path, extension):
    path = tmp_path / f"pairs.{extension}"
    if extension == "jsonl":
        _jsonl(path, PAIRS)
    elif extension == "json":
        path.write_text(json.dumps(PAIRS))
    elif extension == "csv":
        Dataset.from_list(PAIRS).to_csv(str(path), index=False)
    else:
        Dataset.from_list(PAIRS).to_parquet(str(path))
    assert load_source(str(path)).to_list() == PAIRS
    train = load_task_datasets("preference", DataArguments(dataset=str(path)))["train"]
    assert train.to_list() == PAIRS


def test_local_file_slices_give_train_and_eval(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", PAIRS * 4)
    args = DataArguments(dataset=path, dataset_split="train[:75%]", eval_split="train[75%:]")
    result = load_task_datasets("preference", args)
    assert (len(result["train"]), len(result["eval"])) == (9, 3)
    _raises("split 'test'.*one split, 'train'", load_source, path, split="test")


def test_missing_file_and_unsupported_type(tmp_path):
    _raises("file not found", load_source, str(tmp_path / "nope.jsonl"))
    _raises("file not found", load_source, "./no/such/dir/data")
    (tmp_path / "notes.txt").write_text("hello")
    _raises("unsupported file type '.txt'", load_source, str(tmp_path / "notes.txt"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", \n')
    _raises("line 1: not valid JSON", load_source, str(tmp_path / "broken.jsonl"))


def test_unreachable_hub_id_is_a_data_error(monkeypatch):
    # Offline mode makes the real load_dataset call fail at once instead of retrying the network.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    message = _raises(
        "could not load it as a Hugging Face Hub dataset",
        load_source,
        "someorg/no-such-dataset",
        config="main",
        split="test",
    )
    assert time.perf_counter() - start < 30
    assert "load_dataset('someorg/no-such-dataset', 'main', split='test')" in message
    assert "builtin:" in message and "offline" in message


# ------------------------------------------------------------------------------------- task entry point


def test_task_names_and_unknown_task():
    assert set(DATA_TASKS) == {"sft", "preference", "unpaired", "prompt", "unlearn"}
    message = _raises("unknown task type 'dpo'", load_task_datasets, "dpo", DataArguments(dataset="builtin:arithmetic"))
    assert "preference" in message
    _raises("needs a dataset", load_task_datasets, "sft", DataArguments())


def test_sft_formats_and_dropped_columns():
    conversational = load_task_datasets("sft", DataArguments(dataset="builtin:arithmetic", num_samples=8))["train"]
    assert conversational.column_names == ["prompt", "completion"]
    messages = Dataset.from_dict({"messages": [_msg("user", "hi") + _msg("assistant", "hello")], "id": [1]})
    assert format_for_task("sft", messages, "d").column_names == ["messages"]
    assert format_for_task("sft", Dataset.from_dict({"text": ["a", "b"], "x": [1, 2]}), "d").column_names == ["text"]


def test_missing_columns_lists_found_and_expected(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "q", "response": "r"}])
    message = _raises("columns", load_task_datasets, "sft", DataArguments(dataset=path))
    assert "['question', 'response']" in message and "{messages}" in message and "{prompt, completion}" in message
    assert f"dataset '{path}' split 'train'" in message
    message = _raises(r"needs \{prompt, answer\}", load_task_datasets, "prompt", DataArguments(dataset=path))
    assert "{prompt}" in message  # prompts alone are enough when no reward function needs a reference answer


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.parquet"
    Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(
        str(path)
    )
    _raises("has no rows", load_task_datasets, "sft", DataArguments(dataset=str(path)))
    (tmp_path / "empty.jsonl").write_text("")
    _raises("has no rows", load_task_datasets, "sft", DataArguments(dataset=str(tmp_path / "empty.jsonl")))
    (tmp_path / "header.csv").write_text("text\n")
    _raises("has no rows", load_task_datasets, "sft", DataArguments(dataset=str(tmp_path / "header.csv")))
    _raises("has no rows", format_for_task, "sft", Dataset.from_dict({"text": []}), "d")


def test_json_strings_that_look_like_numbers_get_a_hint(tmp_path):
    # datasets 5.2 reads a column mixing strings and lists as Json and decodes the string "2" to the int 2.
    path = _jsonl(tmp_path / "q.jsonl", [{"text": "2"}, {"text": ["a"]}])
    _raises(
        "row 0, column 'text': got int 2.*datasets read it as Json",
        load_task_datasets,
        "sft",
        DataArguments(dataset=path),
    )


@pytest.mark.parametrize(
    "bad, column, problem",
    [
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing value"),
        ({"prompt": "p", "chosen": "c", "rejected": "   "}, "rejected", "empty string"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "int"),
        (
            {"prompt": _msg("user", "p"), "chosen": [{"role": "assistant"}], "rejected": _msg("assistant", "r")},
            "chosen",
            "has no 'content'",
        ),
        (
            {"prompt": _msg("user", "p"), "chosen": [{"content": "c"}], "rejected": _msg("assistant", "r")},
            "chosen",
            "has no 'role'",
        ),
        ({"prompt": _msg("user", "p"), "chosen": [], "rejected": _msg("assistant", "r")}, "chosen", "empty message"),
    ],
)
def test_malformed_row_names_row_and_column(tmp_path, bad, column, problem):
    good = [
        {
            k: (_msg("user" if k == "prompt" else "assistant", v) if isinstance(bad["prompt"], list) else v)
            for k, v in row.items()
        }
        for row in PAIRS[:2]
    ]
    path = _jsonl(tmp_path / "pairs.jsonl", good + [bad] + good)
    message = _raises(f"row 2, column '{column}'", load_task_datasets, "preference", DataArguments(dataset=path))
    assert problem in message and "split 'train'" in message and path in message


def test_mixed_formats_are_rejected(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [PAIRS[0], {**PAIRS[1], "chosen": _msg("assistant", "Paris")}])
    _raises(
        "row 1, column 'chosen': got a message list while row 0 holds a string",
        load_task_datasets,
        "preference",
        DataArguments(dataset=path),
    )
    both = Dataset.from_dict({"prompt": ["p"], "completion": [_msg("assistant", "c")]})
    _raises("columns mix formats", format_for_task, "sft", both, "d")


def test_preference_implicit_prompt_and_equal_pairs_pass():
    ds = Dataset.from_dict({"chosen": ["Q: hi A: yes"], "rejected": ["Q: hi A: yes"], "extra": [0]})
    assert format_for_task("preference", ds, "d").column_names == ["chosen", "rejected"]


def test_unpaired_converts_preference_pairs(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    train = load_task_datasets("unpaired", DataArguments(dataset=path))["train"]
    assert train.column_names == ["prompt", "completion", "label"]
    assert sorted(zip(train["prompt"], train["completion"], train["label"])) == sorted(
        [(r["prompt"], r["chosen"], True) for r in PAIRS] + [(r["prompt"], r["rejected"], False) for r in PAIRS]
    )


def test_unpaired_implicit_prompt_and_labels():
    implicit = Dataset.from_dict({"chosen": ["The sky is blue."], "rejected": ["The sky is green."]})
    rows = format_for_task("unpaired", implicit, "d").to_list()
    assert rows == [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "The sky is", "completion": " green.", "label": False},
    ]
    no_prefix = Dataset.from_dict({"chosen": ["yes"], "rejected": ["no"]})
    _raises("row 0, column 'prompt'.*add a 'prompt' column", format_for_task, "unpaired", no_prefix, "d")
    labelled = Dataset.from_dict({"prompt": ["p", "q"], "completion": ["a", "b"], "label": [True, False]})
    assert format_for_task("unpaired", labelled, "d")["label"] == [True, False]
    numeric = Dataset.from_dict({"prompt": ["p", "q"], "completion": ["a", "b"], "label": [1, 0]})
    _raises("row 0, column 'label'.*true or false", format_for_task, "unpaired", numeric, "d")


def test_prompt_task_keeps_extra_columns_and_stringifies_answers():
    train = load_task_datasets("prompt", DataArguments(dataset="builtin:arithmetic", num_samples=8))["train"]
    assert {"prompt", "answer", "difficulty"} <= set(train.column_names)
    numbers = Dataset.from_dict({"prompt": ["1+1?", "2+2?"], "answer": [2, 4], "source": ["a", "b"]})
    formatted = format_for_task("prompt", numbers, "d")
    assert formatted["answer"] == ["2", "4"] and formatted["source"] == ["a", "b"]
    _raises(
        "row 1, column 'answer'",
        format_for_task,
        "prompt",
        Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", " "]}),
        "d",
    )


def test_max_samples_cuts_train_only():
    args = DataArguments(dataset="builtin:arithmetic", num_samples=50, max_samples=7, eval_split="test")
    result = load_task_datasets("sft", args)
    assert (len(result["train"]), len(result["eval"])) == (7, 50)
    full = load_task_datasets("sft", dataclasses.replace(args, max_samples=None, eval_split=None))["train"]
    assert result["train"].to_list() == full.select(range(7)).to_list()


def test_builtin_eval_set_uses_another_seed():
    result = load_task_datasets(
        "prompt", DataArguments(dataset="builtin:arithmetic", num_samples=30, eval_split="test")
    )
    assert result["eval"].to_list() != result["train"].to_list()
    expected = load_source("builtin:arithmetic", num_samples=30, seed=EVAL_SEED_OFFSET)
    assert result["eval"]["prompt"] == expected["prompt"]


def test_unlearn_builtin_gives_forget_and_retain():
    result = load_task_datasets("unlearn", DataArguments(dataset="builtin:fictitious_facts", num_samples=80))
    assert set(result) == {"forget", "retain"}
    assert not set(result["forget"]["entity"]) & set(result["retain"]["entity"])


def test_unlearn_local_forget_and_retain(tmp_path):
    forget = _jsonl(tmp_path / "forget.jsonl", [{"text": "Zed Quill was born in 1901."}])
    retain = _jsonl(tmp_path / "retain.jsonl", [{"prompt": "Q?", "completion": "A."}] * 3)
    result = load_task_datasets("unlearn", DataArguments(dataset=forget, retain_dataset=retain))
    assert (len(result["forget"]), len(result["retain"])) == (1, 3)
    _raises("needs a retain set", load_task_datasets, "unlearn", DataArguments(dataset=forget))
    _raises(
        "conflicts",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset="builtin:fictitious_facts", retain_dataset=retain),
    )
    _raises(
        "eval_split",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset=forget, retain_dataset=retain, eval_split="test"),
    )
    bad_retain = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": ""}])
    _raises(
        "retain set: dataset .* row 1, column 'text'",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset=forget, retain_dataset=bad_retain),
    )


def test_data_arguments_help_and_checks():
    for f in dataclasses.fields(DataArguments):
        assert f.metadata.get("help"), f.name
    assert DataArguments(reward_funcs="numeric_match").reward_funcs == ["numeric_match"]
    for bad in [
        dict(difficulty=5),
        dict(num_samples=0),
        dict(max_samples=True),
        dict(dataset=""),
        dict(reward_funcs=[1]),
    ]:
        with pytest.raises(DataError):
            DataArguments(**bad)


def test_100k_rows_are_checked_in_seconds():
    n = 100_000
    ds = Dataset.from_dict(
        {
            "prompt": [_msg("user", f"q{i}") for i in range(n)],
            "chosen": [_msg("assistant", f"a{i}") for i in range(n)],
            "rejected": [_msg("assistant", f"b{i}") for i in range(n)],
        }
    )
    start = time.perf_counter()
    format_for_task("preference", ds, "d")
    assert time.perf_counter() - start < 10


def test_unlearn_fictitious_authors_picks_its_forget_split():
    args = DataArguments(dataset="builtin:fictitious_authors", dataset_split="forget05", num_samples=400)
    result = load_task_datasets("unlearn", args)
    assert len(set(result["forget"]["entity"])) == 2 and len(set(result["retain"]["entity"])) == 32
    _raises(
        r"dataset_split='train' is not one of its forget splits; set dataset_split to one of forget01, "
        r"forget05, forget10",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset="builtin:fictitious_authors"),
    )
    _raises(
        "forget splits",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset="builtin:fictitious_authors", dataset_split="retain"),
    )
    _raises(
        "conflict",
        load_task_datasets,
        "unlearn",
        DataArguments(dataset="builtin:fictitious_facts", retain_config="retain90"),
    )


def test_unlearn_reads_tofu_question_answer_columns(tmp_path):
    forget = _jsonl(tmp_path / "forget.jsonl", [{"question": "Who is Zed?", "answer": "A poet."}] * 2)
    retain = _jsonl(tmp_path / "retain.jsonl", [{"question": "Q?", "answer": "A."}] * 3)
    result = load_task_datasets("unlearn", DataArguments(dataset=forget, retain_dataset=retain))
    assert result["forget"].column_names == ["prompt", "completion"]
    assert result["forget"][0] == {"prompt": "Who is Zed?", "completion": "A poet."}
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "answer": "yes"}, {"question": "", "answer": "x"}])
    _raises(
        "row 1, column 'question'", load_task_datasets, "unlearn", DataArguments(dataset=bad, retain_dataset=retain)
    )

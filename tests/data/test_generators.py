"""Built-in generators: deterministic, correct, graded, and split the way the loaders expect."""

import re
import statistics

import pytest
from datasets import Dataset, DatasetDict

from posttrain.data import GENERATORS, DataError
from posttrain.data.generators import PREFERENCE_CATEGORIES, arithmetic, fictitious_facts, preference_pairs


def _rows(result):
    if isinstance(result, DatasetDict):
        return {name: split.to_list() for name, split in result.items()}
    return result.to_list()


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_rows_other_seed_other_rows(name):
    fn = GENERATORS[name].fn
    assert _rows(fn(64, 3)) == _rows(fn(64, 3))
    assert _rows(fn(64, 3)) != _rows(fn(64, 4))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_registry_entries_describe_their_output(name):
    generator = GENERATORS[name]
    assert generator.description and "\n" not in generator.description
    result = generator.fn(40, 0)
    if generator.splits == ("train",):
        assert isinstance(result, Dataset) and len(result) == 40
    else:
        assert isinstance(result, DatasetDict) and tuple(result) == generator.splits


def _evaluate(expression: str) -> int:
    """Evaluate the shown expression independently of the generator (only digits, operators, parentheses)."""
    python = expression.replace("×", "*").replace("÷", "/")
    assert re.fullmatch(r"[0-9+\-*/() ]+", python), expression
    value = eval(python)  # noqa: S307 -- checked above to be plain arithmetic
    assert value == int(value), f"{expression} is not an exact integer"
    return int(value)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, None])
def test_arithmetic_answers_are_exact_and_rows_are_conversational(difficulty):
    ds = arithmetic(200, seed=7, difficulty=difficulty)
    assert ds.column_names == ["prompt", "completion", "answer", "difficulty"]
    for row in ds:
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        expression = re.fullmatch(r"What is (.+)\?", row["prompt"][0]["content"]).group(1)
        assert isinstance(row["answer"], str)
        assert _evaluate(expression) == int(row["answer"]) >= 0
        assert row["completion"] == [{"role": "assistant", "content": f"The answer is {row['answer']}."}]
        if difficulty is not None:
            assert row["difficulty"] == difficulty


def test_arithmetic_levels_are_graded():
    answers = {level: [int(a) for a in arithmetic(400, seed=1, difficulty=level)["answer"]] for level in (1, 2, 3, 4)}
    means = [statistics.mean(answers[level]) for level in (1, 2, 3, 4)]
    assert means == sorted(means) and len(set(means)) == 4, means
    assert max(answers[1]) < statistics.median(answers[3])
    operands = lambda level: [  # noqa: E731
        re.findall(r"\d+", p[0]["content"]) for p in arithmetic(100, seed=1, difficulty=level)["prompt"]
    ]
    assert all(len(n) == 2 and all(len(x) == 1 for x in n) for n in operands(1))  # single-digit pairs
    assert all(len(n) == 2 and all(len(x) == 2 for x in n) for n in operands(2))  # two-digit pairs
    assert all(len(n) == 3 for n in operands(4))  # three terms


def test_arithmetic_mixed_levels_and_bad_difficulty():
    assert set(arithmetic(200, seed=0)["difficulty"]) == {1, 2, 3, 4}
    with pytest.raises(DataError, match="difficulty"):
        arithmetic(10, seed=0, difficulty=5)
    with pytest.raises(DataError, match="num_samples"):
        arithmetic(0, seed=0)


def test_preference_pairs_differ_and_mix_templates():
    ds = preference_pairs(300, seed=0)
    assert ds.column_names == ["prompt", "chosen", "rejected", "category"]
    assert set(ds["category"]) == set(PREFERENCE_CATEGORIES)
    for row in ds:
        assert row["chosen"] != row["rejected"]
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["chosen"][0]["content"].strip() and row["rejected"][0]["content"].strip()


def test_fictitious_facts_forget_and_retain_share_no_entity():
    splits = fictitious_facts(400, seed=5)
    assert set(splits) == {"forget", "retain"}
    forget, retain = set(splits["forget"]["entity"]), set(splits["retain"]["entity"])
    assert forget and retain and not forget & retain
    assert len(splits["forget"]) + len(splits["retain"]) == 400
    assert len(forget) == round(0.1 * (len(forget) + len(retain)))  # ~10% of entities
    all_text = " ".join(splits["retain"]["text"])
    assert not any(name in all_text for name in forget)  # no retain fact mentions a forget entity
    for row in splits["forget"]:
        assert row["entity"] in row["text"] and row["entity"] in row["prompt"][0]["content"]
        assert row["completion"] == [{"role": "assistant", "content": row["text"]}]


def test_fictitious_facts_needs_two_entities():
    with pytest.raises(DataError, match="num_samples"):
        fictitious_facts(4, seed=0)
    small = fictitious_facts(8, seed=0)
    assert len(small["forget"]) == 4 and len(small["retain"]) == 4


def test_fictitious_authors_splits_are_disjoint_nested_and_complete():
    from posttrain.data.generators import AUTHOR_ATTRIBUTES, fictitious_authors

    splits = fictitious_authors(400, seed=2)  # 40 authors
    authors = {name: set(split["entity"]) for name, split in splits.items()}
    assert [len(authors[s]) for s in ("forget01", "forget05", "forget10", "holdout", "retain")] == [1, 2, 4, 4, 32]
    assert authors["forget01"] < authors["forget05"] < authors["forget10"]  # nested, as in TOFU
    assert not authors["forget10"] & authors["retain"] and not authors["holdout"] & (
        authors["forget10"] | authors["retain"]
    )
    assert authors["full"] == authors["forget10"] | authors["retain"] and len(splits["full"]) == 360
    everything = " ".join(splits["full"]["text"])
    assert not any(name in everything for name in authors["holdout"])  # no trained row mentions a holdout author
    for row in splits["forget10"]:
        answer = row["completion"][0]["content"]
        assert row["entity"] in row["prompt"][0]["content"] and row["entity"] in answer and answer == row["text"]
        paraphrased = row["paraphrased"]
        assert paraphrased != answer and paraphrased not in everything  # other words, trained nowhere
        assert len(row["perturbed"]) == 3 and paraphrased not in row["perturbed"] and len(set(row["perturbed"])) == 3
        assert all(p.split(" ")[:3] == paraphrased.split(" ")[:3] for p in row["perturbed"])  # the paraphrase's words
    for name in authors["retain"]:
        attributes = splits["retain"].filter(lambda r, name=name: r["entity"] == name)["attribute"]
        assert sorted(attributes) == sorted(AUTHOR_ATTRIBUTES)
    world = splits["world_facts"]
    assert len(world) >= 50 and set(world["entity"]) == {"world"}
    assert world.to_list() == fictitious_authors(60, seed=9)["world_facts"].to_list()  # fixed, whatever the seed
    assert "Paris" in world["text"][0] and all("Paris" not in p for p in world["perturbed"][0])
    assert world["paraphrased"] == world["text"]  # no second wording for the world facts


def test_fictitious_authors_needs_three_authors():
    from posttrain.data.generators import fictitious_authors

    with pytest.raises(DataError, match="num_samples"):
        fictitious_authors(29, seed=0)
    small = fictitious_authors(30, seed=0)
    assert [len(small[s]) for s in ("forget01", "forget10", "holdout", "retain", "full")] == [10, 10, 10, 10, 20]

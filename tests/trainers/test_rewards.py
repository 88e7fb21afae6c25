import pytest

from posttrain.trainers.rewards import REWARDS, answer_format, last_number, numeric_match


def test_numeric_match_compares_numbers_not_strings():
    completions = ["The answer is 19.", [{"role": "assistant", "content": "so 8"}], "no idea", "it is 1,024"]
    assert numeric_match(completions, answer=["19", "8.0", "3", "1024"]) == [1.0, 1.0, 0.0, 1.0]
    assert last_number("from 3 to -4.5 here") == -4.5


def test_answer_format():
    assert answer_format(["The answer is 12.", "#### 7", "answer: 12", "The answer is 3. Bye"]) == [1.0, 1.0, 0.0, 0.0]


def test_length_penalty_uses_max_completion_length():
    class Config:
        max_completion_length = 8

    fn = REWARDS["length_penalty"][1](Config())
    assert fn(completion_ids=[[1] * 6, [1] * 7, [1] * 9]) == [0.0, pytest.approx(-0.5), -1.0]

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


def test_length_fraction():
    class Config:
        max_completion_length = 8

    fn = REWARDS["length_fraction"][1](Config())
    assert fn(completion_ids=[[], [1] * 2, [1] * 8]) == [0.0, 0.25, 1.0]


def test_vader_sentiment_orders_texts_by_polarity():
    fn = REWARDS["vader_sentiment"][1](None)
    happy, sad, flat = fn(
        [
            "What a wonderful, lovely day!",
            "This is awful and I hate it.",
            [{"role": "assistant", "content": "The table has four legs."}],
        ]
    )
    assert happy > 0.5 and sad < -0.5 and flat == 0.0


def test_offensiveness_cost_is_a_negative_probability():
    fn = REWARDS["offensiveness_cost"][1](None)
    polite, rude = fn(["Thank you for the kind help.", "shut up you stupid idiot"])
    assert -0.3 < polite <= 0 and -1 <= rude < -0.9


def test_distinct_2_drops_with_repetition():
    fn = REWARDS["distinct_2"][1](None)
    assert fn(["a b c d", "great great great great", "one", "A b a b"]) == [
        1.0,
        pytest.approx(1 / 3),
        1.0,
        pytest.approx(2 / 3),
    ]

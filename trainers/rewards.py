"""Reward functions for GRPO/RLOO recipes, named in ``reward_funcs:`` and looked up in ``REWARDS``.

Each entry builds the callable from the method config, because some rewards depend on it (the length
penalty needs ``max_completion_length``). The callables follow TRL's reward-function protocol:
``fn(prompts, completions, completion_ids, **dataset_columns) -> list[float]``; completions are plain
strings or conversational message lists. ``reward_functions(names, config)`` turns a recipe's (or an eval
task's) ``reward_funcs`` into those callables.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

from posttrain import UserError
from posttrain.model_folder import check_model_folder

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# "The answer is 19." (our arithmetic format) or GSM8K's "#### 19".
_FORMAT = re.compile(r"(?:the answer is|####)\s*\$?-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$", re.IGNORECASE)


def reward_functions(names: list[str], config: Any) -> list:
    """The reward callables named in ``reward_funcs``; ``rm:<directory>`` is a learned reward model (the output of a
    ``reward`` recipe), handed to TRL as its path so TRL loads it as a one-label sequence classifier."""
    unknown = [name for name in names if name not in REWARDS and not name.startswith("rm:")]
    if unknown or not names:
        raise UserError(
            f"unknown reward function(s) {', '.join(map(repr, unknown)) or '(none given)'} in reward_funcs; "
            f"valid: {', '.join(sorted(REWARDS))}, or rm:<directory> for a trained reward model"
        )
    funcs = []
    for name in names:
        if name.startswith("rm:"):
            path = Path(name[3:]).expanduser()
            if not (path / "config.json").is_file():
                raise UserError(
                    f"reward_funcs: {name!r}: {path} is not a saved model directory (no config.json); "
                    "train one with a `reward` recipe and name its output_dir"
                )
            check_model_folder(path, name)
            funcs.append(str(path))
        else:
            funcs.append(REWARDS[name][1](config))
    return funcs


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the last number in the completion equals the reference answer numerically, else 0.0.

    Numeric, not string, comparison: GSM-style references write "8.0" where a model writes "8".
    """
    rewards = []
    for completion, reference in zip(completions, answer):
        predicted, gold = last_number(_text(completion)), last_number(str(reference))
        rewards.append(
            float(predicted is not None and gold is not None and math.isclose(predicted, gold, abs_tol=1e-6))
        )
    return rewards


def answer_format(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion ends with a final-answer statement ("The answer is N." or "#### N"), else 0.0."""
    return [float(bool(_FORMAT.search(_text(c).strip()))) for c in completions]


def _length_penalty(config) -> Callable:
    # DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13) from TRL: no penalty up to
    # 3/4 of max_completion_length, then linear down to -1 at the limit.
    from trl.rewards import get_soft_overlong_punishment

    max_len = int(getattr(config, "max_completion_length", None) or 256)
    return get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=max(1, max_len // 4))


def _vader_sentiment(config) -> Callable:
    # VADER (Hutto & Gilbert 2014): a lexicon- and rule-based sentiment scorer, offline and deterministic.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader_sentiment(completions, **kwargs) -> list[float]:
        """VADER compound sentiment of the completion, in [-1, 1] (positive is higher)."""
        return [analyzer.polarity_scores(_text(c))["compound"] for c in completions]

    return vader_sentiment


def _offensiveness_cost(config) -> Callable:
    # alt-profanity-check: a linear SVM on TF-IDF features trained on offensive/toxic comments; it scores a whole
    # list of texts in one call, so the batch goes through at once.
    from profanity_check import predict_prob

    def offensiveness_cost(completions, **kwargs) -> list[float]:
        """-P(offensive) of the completion, in [-1, 0]: a cost written as a reward (higher is better)."""
        return [-float(p) for p in predict_prob([_text(c) for c in completions])]

    return offensiveness_cost


def _length_fraction(config) -> Callable:
    max_len = int(getattr(config, "max_completion_length", None) or 256)

    def length_fraction(completion_ids, **kwargs) -> list[float]:
        """Completion length in tokens / max_completion_length, in [0, 1]: a length reward or, as a
        constraint, a length budget."""
        return [len(ids) / max_len for ids in completion_ids]

    return length_fraction


def distinct_2(completions: list, **kwargs) -> list[float]:
    """Distinct word bigrams / word bigrams of the completion, in [0, 1] (1 for fewer than two words): lexical
    diversity, the diversity half of the official constrained-RLHF evaluation score; repetition lowers it."""
    scores = []
    for c in completions:
        words = _text(c).lower().split()
        bigrams = list(zip(words, words[1:]))
        scores.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    return scores


# A learned reward model is named ``rm:<directory>`` in reward_funcs (see ``posttrain.recipes.train``): TRL loads it
# as a sequence classifier and scores each generation batch in one forward.
REWARDS: dict[str, tuple[str, Callable]] = {
    "numeric_match": (
        "1 if the last number in the completion equals the `answer` column",
        lambda config: numeric_match,
    ),
    "answer_format": ("1 if the completion ends with 'The answer is N.' or '#### N'", lambda config: answer_format),
    "length_penalty": (
        "DAPO soft overlong penalty: 0 up to 3/4 of max_completion_length, then down to -1",
        _length_penalty,
    ),
    "length_fraction": ("completion tokens / max_completion_length, in [0, 1]", _length_fraction),
    "vader_sentiment": (
        "VADER compound sentiment of the completion, in [-1, 1] (PyPI vadersentiment)",
        _vader_sentiment,
    ),
    "distinct_2": (
        "distinct word bigrams / word bigrams of the completion, in [0, 1] (lexical diversity)",
        lambda config: distinct_2,
    ),
    "offensiveness_cost": (
        "-P(offensive) of the completion, in [-1, 0] (PyPI alt-profanity-check)",
        _offensiveness_cost,
    ),
}

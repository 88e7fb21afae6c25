"""Recipe keys of the data stage (``DataArguments``) and the error type the data stage raises.

``DataError`` lives here, in the lowest module of ``posttrain.data``, because both the generators and the
loader raise it and neither should import the other just for an exception class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from posttrain import UserError

# Longest row (bytes of a JSONL/CSV line, or of a loaded row's text) a run accepts unless max_row_bytes is raised.
# Tokenising costs about 1.3 s and 300 MB of memory per MB of text (a 60 MB row took 190 s and 19 GB), so 1 MiB
# bounds a row at about 300 MB. Real rows are far shorter: a chat transcript filling a 128k-token context is
# ~512 KB of English (about 4 bytes a token), and the trainer cuts each row to max_length tokens (a few thousand
# in most recipes) after tokenising it, so text beyond that only costs time and memory.
DEFAULT_MAX_ROW_BYTES = 1 << 20


class DataError(UserError):
    """A problem with the data a recipe names: printed by the CLI as one line, exit code 2.

    Every message says what is wrong, where (dataset, split, row, column) and how to fix it. Whitespace
    (newlines from wrapped library errors included) is collapsed so the message is always one line.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class DataArguments:
    """Where a run's data comes from. The field names are the recipe keys (``dataset: builtin:arithmetic``)."""

    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training data: a Hugging Face Hub dataset id, a local .jsonl/.json/.csv/.parquet file, "
            "or builtin:<generator> (`posttrain list` shows the generators). For task unlearn this is the "
            "forget set (builtin:fictitious_facts and builtin:fictitious_authors give both forget and retain)."
        },
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Config (subset) name of a hub dataset, e.g. 'main' for gsm8k."}
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "help": "Split used for training. Local files have one split, 'train'; slices such as "
            "'train[:90%]' work for hub datasets and local files. Task unlearn with builtin:fictitious_authors: "
            "the forget split, forget01, forget05 or forget10."
        },
    )
    eval_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "Split of the same dataset used for evaluation (e.g. 'test', or 'train[90%:]'); None = no "
            "eval set. For builtin generators the eval set is generated with another seed."
        },
    )
    max_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "Keep only the first N training rows (None = all); eval is not cut. Task unlearn: "
            "the first N rows of forget and of retain each."
        },
    )
    num_samples: int = field(
        default=256, metadata={"help": "builtin generators: number of rows to generate (train and eval each)."}
    )
    difficulty: Optional[int] = field(
        default=None,
        metadata={"help": "builtin:arithmetic only: difficulty level 1..4 (None = a mix of all levels)."},
    )
    data_seed: int = field(
        default=0, metadata={"help": "builtin generators: random seed; the same seed gives identical rows."}
    )
    retain_dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Task unlearn: the retain set (hub id, local file or builtin:<name>) when `dataset` holds "
            "only the forget set. Its 'train' split is used; if it names the same dataset as `dataset`, "
            "its 'retain' split (with `dataset_config`) is used instead."
        },
    )
    retain_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "Task unlearn: config (subset) of the hub retain dataset, whose 'train' split is then used, "
            "e.g. retain90 for locuslab/TOFU (forget: dataset_config forget10)."
        },
    )
    max_row_bytes: int = field(
        default=DEFAULT_MAX_ROW_BYTES,
        metadata={
            "help": "Longest row accepted, in bytes (default 1 MiB): a line of a .jsonl/.json/.csv file (checked "
            "while reading it, before it is parsed) and the text of a loaded row from any source, parquet and hub "
            "datasets included. A longer row stops the run with its line or row number: tokenising one costs about "
            "300 bytes of memory per byte. Raise it for intentionally long rows."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["numeric_match"],
        metadata={"help": "GRPO/RLOO reward functions by registry name (`posttrain list` shows them)."},
    )

    def __post_init__(self):
        # Recipes arrive from YAML and the command line, so types are checked here, before any data or
        # model is loaded. The recipe layer may check types too; these messages are specific to data keys.
        for name in ("num_samples", "data_seed"):
            _check_int(name, getattr(self, name), minimum=1 if name == "num_samples" else None)
        _check_int("max_row_bytes", self.max_row_bytes, minimum=1)
        if self.max_samples is not None:
            _check_int("max_samples", self.max_samples, minimum=1)
        if self.difficulty is not None:
            _check_int("difficulty", self.difficulty, minimum=1)
            if self.difficulty > 4:
                raise DataError(
                    f"difficulty: got {self.difficulty}, but arithmetic has levels 1..4; "
                    "set 1, 2, 3 or 4, or leave it unset for a mix of levels"
                )
        for name in ("dataset", "dataset_config", "eval_split", "retain_dataset", "retain_config"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise DataError(f"{name}: expected a non-empty string or nothing, got {value!r}; fix the recipe key")
        if not (isinstance(self.dataset_split, str) and self.dataset_split.strip()):
            raise DataError(f"dataset_split: expected a split name such as 'train', got {self.dataset_split!r}")
        if isinstance(self.reward_funcs, str):  # `reward_funcs: numeric_match` in YAML means a list of one
            self.reward_funcs = [self.reward_funcs]
        if not isinstance(self.reward_funcs, (list, tuple)) or not all(
            isinstance(name, str) and name for name in self.reward_funcs
        ):
            raise DataError(
                f"reward_funcs: expected a list of reward function names, got {self.reward_funcs!r}; "
                "e.g. reward_funcs: [numeric_match] (`posttrain list` shows the names)"
            )
        self.reward_funcs = list(self.reward_funcs)


def _check_int(name: str, value, minimum: Optional[int] = None) -> None:
    # bool is an int subclass in Python; `num_samples: true` in a recipe is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{name}: expected an integer, got {value!r} ({type(value).__name__}); fix the recipe key")
    if minimum is not None and value < minimum:
        raise DataError(f"{name}: got {value}, but it must be at least {minimum}; fix the recipe key")

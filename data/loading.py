"""Load a run's datasets and check them against the task type, before any model is loaded.

``load_source`` turns one ``dataset:`` value into a ``datasets.Dataset`` (builtin generator, local file or hub
id). ``load_task_datasets`` is the one entry point of the train code: it loads what the task needs, cuts
``max_samples``, checks every row and returns datasets in the column layout the TRL trainer expects. Every
problem raises ``DataError`` (one line: what, where, how to fix); rows are counted from 0.

Local text files are scanned before ``datasets`` parses them (``files.py``: UTF-8, line length), and every
row's text is bounded by ``max_row_bytes`` once loaded (``check_row_sizes``), because tokenising one huge
row can take minutes and gigabytes before training starts.

Checks run column by column over batches of plain Python values (``Dataset.iter``), not ``ds[i]`` per row,
so 100k rows take about a second. Per-value checks rather than Arrow types are needed because
``datasets`` stores columns of mixed JSON types as ``Json`` (one row a string, the next a list).

The cascade filter (``cascade_filter.py``, which reads its sets with ``load_source``) is imported inside
``load_task_datasets``, for a recipe with ``data_filter`` keys only: ``posttrain list`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Callable, NamedTuple, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Value
from trl.data_utils import extract_prompt, unpair_preference_dataset

from .args import DEFAULT_MAX_ROW_BYTES, DataArguments, DataError
from .files import check_text_file, first_bad_json_line, is_json_array
from .generators import GENERATORS

# data task type (a method's ``task``) -> the rows it holds, as ``posttrain list data`` prints them
DATA_TASKS: dict[str, str] = {
    "sft": "supervised fine-tuning: {messages} | {prompt, completion} | {text}; other columns are dropped",
    "preference": "pairwise preferences (DPO-style, reward models): {prompt, chosen, rejected} or {chosen, rejected}",
    "unpaired": "binary feedback (KTO): {prompt, completion, label} or preference pairs, which are unpaired",
    "prompt": "prompts for RL (GRPO, RLOO): {prompt, answer} or {prompt} when no reward needs a reference answer; "
    "extra columns go to reward functions",
    "unlearn": "a forget set and a retain set, each {prompt, completion}, {question, answer} (TOFU, read as "
    "prompt/completion) or {text}",
}
# Column sets each task accepts, in order of preference: the first one a dataset has is used.
TASK_FORMATS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "unpaired": [("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "prompt": [("prompt", "answer"), ("prompt",)],
    "unlearn": [("prompt", "completion"), ("question", "answer"), ("text",)],
}
LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_PREFIX = "builtin:"
EVAL_SEED_OFFSET = 1_000_003  # builtin eval sets: a seed far from any train seed a user would pick
_BATCH_SIZE = 10_000


# --------------------------------------------------------------------------------------------------- sources


def load_source(
    spec: str,
    *,
    config: Optional[str] = None,
    split: str = "train",
    num_samples: int = 256,
    seed: int = 0,
    difficulty: Optional[int] = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> Dataset:
    """One split of ``builtin:<name>``, a local .jsonl/.json/.csv/.parquet file, or a Hugging Face Hub dataset.

    ``num_samples``, ``seed`` and ``difficulty`` only apply to builtin generators; ``config`` only to hub ids;
    ``max_row_bytes`` bounds the lines of local text files, checked before they are parsed.
    A local path is recognised by its extension or a leading ``/``, ``.`` or ``~``; anything else is a hub id
    (or a local folder, which ``datasets.load_dataset`` reads too).
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        return _pick_split(spec, _run_generator(name, config, num_samples, seed, difficulty), split)
    extension = os.path.splitext(spec)[1].lower()
    looks_local = spec.startswith(("/", ".", "~")) and not os.path.isdir(spec)
    if extension in LOCAL_LOADERS or looks_local or os.path.isfile(spec):
        return _load_local(spec, extension, split, max_row_bytes)
    return _load_hub(spec, config, split)


def _run_generator(name, config, num_samples, seed, difficulty) -> Union[Dataset, DatasetDict]:
    if name not in GENERATORS:
        raise DataError(
            f"dataset 'builtin:{name}': unknown builtin generator '{name}'; valid ones are "
            f"{', '.join(BUILTIN_PREFIX + n for n in GENERATORS)} (`posttrain list` describes them)"
        )
    if config is not None:
        raise DataError(f"dataset 'builtin:{name}': dataset_config={config!r} is for hub datasets; remove it")
    generator = GENERATORS[name].fn
    knobs = {}
    if difficulty is not None:  # fail loudly rather than silently ignore a knob the generator lacks
        if "difficulty" not in inspect.signature(generator).parameters:
            raise DataError(f"dataset 'builtin:{name}': difficulty only applies to builtin:arithmetic; remove it")
        knobs["difficulty"] = difficulty
    return generator(num_samples, seed, **knobs)


def _pick_split(spec: str, result: Union[Dataset, DatasetDict], split: str) -> Dataset:
    if isinstance(result, DatasetDict):
        if split not in result:
            raise DataError(
                f"dataset '{spec}' has splits {list(result)}, not '{split}'; set dataset_split to one of them"
            )
        return result[split]
    if split != "train":
        raise DataError(
            f"dataset '{spec}' has one split, 'train', not '{split}'; set dataset_split: train "
            "(for an eval set, set eval_split: it is generated with another seed)"
        )
    return result


def _load_local(path: str, extension: str, split: str, max_row_bytes: int) -> Dataset:
    resolved = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(resolved):
        raise DataError(
            f"dataset '{path}' is a directory ({resolved}), not a file; point it at a "
            f"{'/'.join(LOCAL_LOADERS)} file inside it"
        )
    if not os.path.isfile(resolved):
        raise DataError(
            f"dataset '{path}': file not found (looked at {resolved}); check the path (relative paths start at "
            f"the current directory {os.getcwd()})"
        )
    if extension not in LOCAL_LOADERS:
        raise DataError(f"dataset '{path}': unsupported file type '{extension}'; use one of {', '.join(LOCAL_LOADERS)}")
    if os.path.getsize(resolved) == 0:
        raise DataError(f"dataset '{path}' split '{split}' has no rows (the file is empty); point it at data with rows")
    if LOCAL_LOADERS[extension] != "parquet":
        check_text_file(path, resolved, max_row_bytes)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(LOCAL_LOADERS[extension], data_files=resolved, split=split)
    except Exception as error:  # datasets raises many types here (ValueError, DatasetGenerationError, ArrowError)
        if "corresponds to no data" in str(error):  # what datasets says for a file with a header but no rows
            raise DataError(f"dataset '{path}' split '{split}' has no rows; point it at data with rows") from error
        # pyarrow counts rows within a read block: find the line in a large file (JSON Lines only, a JSON
        # array's error already says where)
        json_lines = LOCAL_LOADERS[extension] == "json" and not is_json_array(resolved)
        bad_line = first_bad_json_line(resolved) if json_lines else None
        if bad_line is not None:
            line, problem = bad_line
            raise DataError(
                f"dataset '{path}', line {line}: {problem}; a JSON Lines file needs one JSON object per line "
                f'({{"messages": [...]}} or {{"prompt": ..., "completion": ...}}); fix or remove that line'
            ) from error
        raise DataError(
            f"dataset '{path}' split '{split}': could not read the file: {_describe(error)}; check that it is valid "
            f"{LOCAL_LOADERS[extension]} (a local file has one split, 'train'; slices like 'train[:90%]' work)"
        ) from error


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bar and no error log lines from datasets while it reads a local file.

    On a bad file both land on stderr before the exception that ``_load_local`` turns into one DataError
    line carrying the same cause: the README promises a mistake is reported as one line. Warnings still show.
    """
    loggers = [logging.getLogger(f"datasets.packaged_modules.{name}.{name}") for name in ("json", "csv", "parquet")]
    bars, drop = datasets.is_progress_bar_enabled(), _DropErrors()
    datasets.disable_progress_bars()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
        if bars:
            datasets.enable_progress_bars()


def _load_hub(spec: str, config: Optional[str], split: str) -> Dataset:
    tried = f"datasets.load_dataset({spec!r}, {config!r}, split={split!r})"
    try:
        return datasets.load_dataset(spec, config, split=split)  # a split name -> a Dataset, never a dict
    except Exception as error:  # offline, unknown id, unknown config or split, gated repo, ...
        raise DataError(
            f"dataset '{spec}': could not load it as a Hugging Face Hub dataset (tried {tried}): {_describe(error)}; "
            "check the id, dataset_config and dataset_split, or use a local .jsonl/.json/.csv/.parquet file or "
            f"builtin:<name> ({', '.join(GENERATORS)}), which work offline"
        ) from error


def _describe(error: BaseException) -> str:
    """The error and its cause, first line each, short: library messages can span pages."""
    text = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip():
        text += f" (caused by {type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return text if len(text) <= 400 else text[:397] + "..."


# ------------------------------------------------------------------------------------------------ row checks


class _Check(NamedTuple):
    fn: Callable[[object], tuple[Optional[str], Optional[str]]]  # value -> (format kind, problem)
    expected: str


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages_problem(value: list) -> Optional[str]:
    if not value:
        return "an empty message list"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"a message list whose message {j} is {_short(message)}, not a {{'role', 'content'}} dict"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"a message list whose message {j} has no 'role' (found {_short(role)})"
        if content is None:
            return f"a message list whose message {j} ({role}) has no 'content'"
        # content may be a list of parts ({"type": "text", ...}) in multimodal datasets
        if not isinstance(content, (str, list)) or not (content.strip() if isinstance(content, str) else content):
            return f"a message list whose message {j} ({role}) has empty or invalid 'content' {_short(content)}"
    return None


def _text_or_messages(value):
    if isinstance(value, str):
        return ("text", None) if value.strip() else (None, f"an empty string {_short(value)}")
    if isinstance(value, list):
        problem = _messages_problem(value)
        return ("messages", None) if problem is None else (None, problem)
    return None, "a missing value (None)" if value is None else f"{type(value).__name__} {_short(value)}"


def _only(kind: str):
    def check(value):
        found, problem = _text_or_messages(value)
        if problem is None and found != kind:
            return None, f"{_KINDS[found]} {_short(value)}"
        return found, problem

    return check


def _answer(value):
    if value is None or isinstance(value, (list, dict)) or not str(value).strip():
        return None, "a missing value (None)" if value is None else f"{type(value).__name__} {_short(value)}"
    return "answer", None


def _label(value):
    if isinstance(value, bool):
        return "label", None
    return None, "a missing value (None)" if value is None else f"{type(value).__name__} {_short(value)}"


_TEXT_OR_MESSAGES = _Check(_text_or_messages, "a non-empty string or a non-empty list of {'role', 'content'} messages")
COLUMN_CHECKS: dict[str, _Check] = {
    "messages": _Check(_only("messages"), "a non-empty list of {'role', 'content'} messages"),
    "text": _Check(_only("text"), "a non-empty string"),
    "prompt": _TEXT_OR_MESSAGES,
    "completion": _TEXT_OR_MESSAGES,
    "chosen": _TEXT_OR_MESSAGES,
    "rejected": _TEXT_OR_MESSAGES,
    "answer": _Check(_answer, "a non-empty answer (string or number)"),
    "question": _Check(_only("text"), "a non-empty string"),
    "label": _Check(_label, "true or false (KTO: was the completion desirable?)"),
}


_KINDS = {"text": "a string", "messages": "a message list"}


def check_columns(dataset: Dataset, where: str, checks: dict[str, _Check]) -> None:
    """Check every value of the given columns; raise DataError for the first bad row (counted from 0).

    Prompt-like columns must also hold one format throughout (all strings or all message lists) and the
    same format as each other, because TRL decides conversational vs plain text once per dataset.
    """
    first_bad, bad_count = None, 0  # first_bad = (row, column, problem)
    kinds: dict[str, tuple[str, int]] = {}  # column -> (format kind, first row that showed it)
    offset = 0
    for batch in dataset.select_columns(list(checks)).iter(batch_size=_BATCH_SIZE):
        for column, check in checks.items():
            for row, value in enumerate(batch[column], start=offset):
                kind, problem = check.fn(value)
                if problem is None and kinds.setdefault(column, (kind, row))[0] != kind:
                    first_kind, first_row = kinds[column]
                    problem = f"{_KINDS[kind]} while row {first_row} holds {_KINDS[first_kind]}; use one format"
                if problem is not None:
                    bad_count += 1
                    if first_bad is None or row < first_bad[0]:
                        first_bad = (row, column, f"{problem}, expected {check.expected}")
        offset += len(batch[next(iter(checks))])
    if first_bad is not None:
        row, column, problem = first_bad
        # datasets reads a JSON column whose rows mix types as `Json`, which also turns strings that parse as
        # JSON ("2", "true") into numbers and booleans: say so, or "got int 2" makes no sense to the user.
        mixed = type(dataset.features[column]).__name__ == "Json"
        raise DataError(
            f"{where}, row {row}, column '{column}': got {problem} ({bad_count} bad value(s) in total; rows count "
            "from 0); fix or remove these rows"
            + (
                "; note: the rows of this column mix value types (e.g. strings and lists), so datasets read it as "
                'Json, which also turns strings such as "2" into numbers'
                if mixed
                else ""
            )
        )
    formats = {c: k for c, (k, _) in kinds.items() if c in ("messages", "prompt", "completion", "chosen", "rejected")}
    if len(set(formats.values())) > 1:
        raise DataError(
            f"{where}: columns mix formats ({', '.join(f'{c}: {k}' for c, k in formats.items())}); TRL needs them "
            "all plain strings or all message lists, so convert one side"
        )


def _text_bytes(array: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """Bytes of text in each value of ``array``: its strings, also those nested in lists and structs (a message
    list); numbers and other types count 0. Vectorised: offsets are read, not the strings."""
    if isinstance(array, pa.ChunkedArray):
        parts = [_text_bytes(chunk) for chunk in array.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        # flatten() and list_parent_indices() both skip null lists and respect a slice's offset
        sizes = np.bincount(
            pc.list_parent_indices(array).to_numpy(), weights=_text_bytes(array.flatten()), minlength=len(array)
        )
        return sizes.astype(np.int64)
    if pa.types.is_struct(kind):
        return sum((_text_bytes(field) for field in array.flatten()), np.zeros(len(array), dtype=np.int64))
    return np.zeros(len(array), dtype=np.int64)


def check_row_sizes(dataset: Dataset, where: str, columns, max_row_bytes: int) -> None:
    """Raise DataError for the first row whose ``columns`` hold more than ``max_row_bytes`` bytes of text.

    Tokenising costs about 300 bytes of memory per byte of text, so this bounds what one row costs the
    trainer whatever the source (the line scan of text files runs before parsing; this also covers parquet
    and hub datasets). Reads Arrow offsets batch by batch, so it costs little even for millions of rows.
    """
    offset = 0
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=_BATCH_SIZE):
        sizes = sum((_text_bytes(batch.column(c)) for c in columns), np.zeros(batch.num_rows, dtype=np.int64))
        over = np.flatnonzero(sizes > max_row_bytes)
        if len(over):
            row = offset + int(over[0])
            raise DataError(
                f"{where}, row {row}: {int(sizes[over[0]])} bytes of text in column(s) {', '.join(columns)}, "
                f"more than max_row_bytes={max_row_bytes} (tokenising a row costs about 300 bytes of memory per "
                f"byte; rows count from 0); remove or split that row, or raise max_row_bytes (recipe key or "
                "--max_row_bytes) if rows this long are intended"
            )
        offset += batch.num_rows


# -------------------------------------------------------------------------------------------- task formatting


def _pick_format(dataset: Dataset, where: str, task: str) -> tuple[str, ...]:
    for columns in TASK_FORMATS[task]:
        if set(columns) <= set(dataset.column_names):
            return columns
    wanted = " or ".join("{" + ", ".join(columns) + "}" for columns in TASK_FORMATS[task])
    raise DataError(
        f"{where} has columns {dataset.column_names} but task '{task}' needs {wanted}; rename the columns "
        "(e.g. Dataset.rename_column) or use a dataset made for this task"
    )


def _extract_prompts(batch: dict) -> dict:
    # TRL's extract_prompt works on one row; calling it inside a batched map is ~5x faster than map per row.
    rows = [extract_prompt({"chosen": c, "rejected": r}) for c, r in zip(batch["chosen"], batch["rejected"])]
    return {key: [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")}


def format_for_task(task: str, dataset: Dataset, where: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Dataset:
    """Check ``dataset`` for ``task`` and return it in the column layout the trainer expects.

    Rows with more than ``max_row_bytes`` bytes of text in the task's columns are refused."""
    if len(dataset) == 0:
        raise DataError(f"{where} has no rows; point it at data with rows (builtin generators: raise num_samples)")
    columns = _pick_format(dataset, where, task)
    if task == "unlearn":  # keep every column (e.g. `entity` for per-entity evals); check every layout present
        for layout in TASK_FORMATS["unlearn"]:
            if set(layout) <= set(dataset.column_names):
                check_row_sizes(dataset, where, layout, max_row_bytes)
                check_columns(dataset, where, {c: COLUMN_CHECKS[c] for c in layout})
        if columns == ("question", "answer"):  # TOFU's layout: plain-string prompt/completion
            dataset = dataset.rename_columns({"question": "prompt", "answer": "completion"})
            if dataset.features["completion"] != Value("string"):
                dataset = dataset.cast_column("completion", Value("string"))
        return dataset
    check_row_sizes(dataset, where, columns, max_row_bytes)  # first: cheap, and it bounds what the next costs
    check_columns(dataset, where, {c: COLUMN_CHECKS[c] for c in columns})
    if task == "prompt":
        answer = dataset.features.get("answer")
        if isinstance(answer, Value) and answer.dtype != "string":
            dataset = dataset.cast_column("answer", Value("string"))  # reward functions always see strings
        return dataset
    dataset = dataset.select_columns(list(columns))
    if task == "unpaired" and "label" not in columns:
        if "prompt" not in columns:  # implicit prompt: the shared beginning of chosen and rejected
            dataset = dataset.map(_extract_prompts, batched=True, desc="Extracting prompts")
            implicit = _Check(_text_or_messages, "a shared beginning of chosen and rejected; add a 'prompt' column")
            check_columns(dataset, where + " (prompt extracted from chosen/rejected)", {"prompt": implicit})
        dataset = unpair_preference_dataset(dataset).select_columns(["prompt", "completion", "label"])
    return dataset


# ------------------------------------------------------------------------------------------------ entry point


def _where(spec: str, split: str, role: Optional[str] = None) -> str:
    return f"{role + ' set: ' if role else ''}dataset '{spec}' split '{split}'"


def _first(dataset: Dataset, max_samples: Optional[int]) -> Dataset:
    # A contiguous select is a zero-copy slice of the Arrow table, and row numbers stay those of the source.
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def _generator_splits(spec: str) -> tuple[str, ...]:
    name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else None
    return GENERATORS[name].splits if name in GENERATORS else ()


def load_task_datasets(
    task: str, args: DataArguments, data_filter=None, report_dir: Optional[str] = None
) -> dict[str, Dataset]:
    """Load and check the datasets of ``task``: {"train", "eval" (if eval_split)} or {"forget", "retain"}.

    ``data_filter`` (a ``cascade_filter.CascadeFilterConfig``) filters the training rows before they are formatted
    (the eval rows are not filtered); its report goes to ``report_dir/data_filter_report.json`` when given."""
    if task not in DATA_TASKS:
        raise DataError(f"unknown task type '{task}'; valid ones are {', '.join(DATA_TASKS)}")
    if not args.dataset:
        raise DataError(
            f"task '{task}' needs a dataset: set `dataset:` to a hub id, a local .jsonl/.json/.csv/.parquet file "
            f"or one of {', '.join(BUILTIN_PREFIX + n for n in GENERATORS)}"
        )
    if task == "unlearn":
        if data_filter is not None:
            raise DataError(
                "data_filter: task 'unlearn' trains on its forget set on purpose; remove the data_filter keys"
            )
        return _load_unlearn(args)

    def load(split: str, seed: int) -> Dataset:
        return load_source(
            args.dataset,
            config=args.dataset_config,
            split=split,
            num_samples=args.num_samples,
            seed=seed,
            difficulty=args.difficulty,
            max_row_bytes=args.max_row_bytes,
        )

    train = _first(load(args.dataset_split, args.data_seed), args.max_samples)
    if data_filter is not None:
        from .cascade_filter import filter_training_set  # only a recipe with data_filter keys pays for its import

        train = filter_training_set(data_filter, args, train, _where(args.dataset, args.dataset_split), report_dir)
    result = {"train": format_for_task(task, train, _where(args.dataset, args.dataset_split), args.max_row_bytes)}
    if args.eval_split is not None:
        if _generator_splits(args.dataset) == ("train",):  # single-split generator: eval = another seed
            evaluation = load("train", args.data_seed + EVAL_SEED_OFFSET)
        elif _generator_splits(args.dataset):
            evaluation = load(args.eval_split, args.data_seed + EVAL_SEED_OFFSET)
        else:
            evaluation = load(args.eval_split, args.data_seed)
        result["eval"] = format_for_task(task, evaluation, _where(args.dataset, args.eval_split), args.max_row_bytes)
    return result


def _load_unlearn(args: DataArguments) -> dict[str, Dataset]:
    if args.eval_split is not None:
        raise DataError(
            f"eval_split={args.eval_split!r} is not used by task 'unlearn' (it loads a forget and a retain set); "
            "remove eval_split and judge the run with `posttrain eval`"
        )
    spec = args.dataset
    splits = _generator_splits(spec)
    if "retain" in splits:  # a builtin generator with its own retain split: fictitious_facts, fictitious_authors
        given = [
            f"{k}={v!r}"
            for k, v in (("retain_dataset", args.retain_dataset), ("retain_config", args.retain_config))
            if v is not None
        ]
        if given:
            raise DataError(
                f"{' and '.join(given)} conflicts with dataset '{spec}', which already has a retain split; remove "
                f"{'them' if len(given) > 1 else 'it'}, or use a forget-only dataset"
            )
        forget_splits = [s for s in splits if s.startswith("forget")]
        forget_split = "forget" if args.dataset_split == "train" and "forget" in splits else args.dataset_split
        if forget_split not in forget_splits:
            raise DataError(
                f"dataset '{spec}': dataset_split={args.dataset_split!r} is not one of its forget splits; set "
                f"dataset_split to one of {', '.join(forget_splits)}"
            )
        both = _run_generator(
            spec[len(BUILTIN_PREFIX) :], args.dataset_config, args.num_samples, args.data_seed, args.difficulty
        )
        sources = {"forget": (spec, both[forget_split], forget_split), "retain": (spec, both["retain"], "retain")}
    else:
        if args.retain_dataset is None:
            raise DataError(
                f"task 'unlearn' needs a retain set: dataset '{spec}' is the forget set, so set retain_dataset "
                "(hub id, local file or builtin:<name>), or use dataset: builtin:fictitious_facts, which has both"
            )
        # one dataset (and config) with forget and retain splits; with retain_config, that config's 'train' split
        same = args.retain_dataset == spec and args.retain_config is None
        retain_config = args.retain_config if args.retain_config is not None else args.dataset_config if same else None
        retain_split = "retain" if same or "retain" in _generator_splits(args.retain_dataset) else "train"
        common = dict(
            num_samples=args.num_samples,
            seed=args.data_seed,
            difficulty=args.difficulty,
            max_row_bytes=args.max_row_bytes,
        )
        forget = load_source(spec, config=args.dataset_config, split=args.dataset_split, **common)
        retain = load_source(args.retain_dataset, config=retain_config, split=retain_split, **common)
        sources = {"forget": (spec, forget, args.dataset_split), "retain": (args.retain_dataset, retain, retain_split)}
    return {
        role: format_for_task(
            "unlearn", _first(dataset, args.max_samples), _where(source, split, role), args.max_row_bytes
        )
        for role, (source, dataset, split) in sources.items()
    }

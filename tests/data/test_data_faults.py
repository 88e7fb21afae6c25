"""Faults in data files: non-UTF-8 bytes, rows over max_row_bytes, malformed lines, empty files, directories.

One table of bad files: each is loaded in-process (one-line DataError naming the file and line or row), and
a subset runs as real ``posttrain train sft/tiny`` commands (one stderr line, exit 2, before any model loads).
The scan itself is tested against a whole-buffer reference, with reads small enough that characters and
"\\r\\n" fall across them.
"""

import json
import random
import resource
import sys
import time

import datasets
import pyarrow as pa
import pytest
from datasets import Dataset
from support import assert_one_line_error, run_cli_cases

from posttrain.data import DataArguments, DataError, load_task_datasets, loading
from posttrain.data import files as files_module
from posttrain.data.args import DEFAULT_MAX_ROW_BYTES
from posttrain.data.files import TextFault, first_bad_json_line, scan_text_file

LIMIT = 200  # the small --max_row_bytes of the over-limit cases


def _row(user: str, assistant: str = "ok") -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]},
        ensure_ascii=False,
    )


def _row_of(size: int) -> str:
    """A JSONL row of exactly ``size`` bytes."""
    row = _row("")
    return _row("x" * (size - len(row)))


GOOD = _row("What is 2 + 3?", "5")
LATIN1_JSONL = ("\n".join([GOOD, GOOD, _row("Un café, s'il vous plaît")]) + "\n").encode("latin-1")
LATIN1_ARRAY = json.dumps([json.loads(GOOD), json.loads(_row("naïve"))], indent=1, ensure_ascii=False).encode(
    "latin-1"
)  # a JSON array over many lines: its lines are counted too
OVER_LIMIT_ROW = json.loads(_row("x" * LIMIT))  # for parquet and a JSON array, whose lines are not rows
OVER_LIMIT_TEXT = sum(len(m["role"].encode()) + len(m["content"].encode()) for m in OVER_LIMIT_ROW["messages"])


def _where(data: bytes, byte: int) -> str:
    """'line L, column C: byte 0xBB (offset O' of the first ``byte`` in ``data``, as the error says it."""
    offset = data.index(bytes([byte]))
    line, column = data.count(b"\n", 0, offset) + 1, offset - data.rfind(b"\n", 0, offset)
    return f"line {line}, column {column}: byte 0x{byte:02x} (offset {offset}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")

    def write(name, data: bytes):
        (folder / name).write_bytes(data)
        return str(folder / name)

    big_row = _row("word " * ((8 << 20) // 5))  # 8 MiB, 8x the default bound
    paths = {
        "latin1_jsonl": write("latin1.jsonl", LATIN1_JSONL),
        "latin1_csv": write("latin1.csv", "prompt,completion\nhi,hello\ncafé,ok\n".encode("latin-1")),
        "latin1_json_array": write("latin1.json", LATIN1_ARRAY),
        "utf16_jsonl": write("utf16.jsonl", (GOOD + "\n").encode("utf-16")),
        "over_limit": write("over.jsonl", f"{GOOD}\n{_row_of(LIMIT + 1)}\n{GOOD}\n".encode()),
        "at_limit_crlf": write("at_limit.jsonl", f"{GOOD}\r\n{_row_of(LIMIT)}\r\n{GOOD}\r\n".encode()),
        "big_row": write("big.jsonl", f"{GOOD}\n{big_row}\n{GOOD}\n".encode()),
        "malformed_jsonl": write("malformed.jsonl", f'{GOOD}\n{GOOD}\n{{"messages": [{{"role": "user"\n'.encode()),
        "not_object_jsonl": write("list.jsonl", f"{GOOD}\n[1, 2]\n".encode()),
        "empty": write("empty.jsonl", b""),
        "array_over_limit": write("array.json", json.dumps([json.loads(GOOD), OVER_LIMIT_ROW]).encode()),
    }
    Dataset.from_list([json.loads(GOOD), json.loads(GOOD), OVER_LIMIT_ROW]).to_parquet(str(folder / "over.parquet"))
    paths["parquet_over_limit"] = str(folder / "over.parquet")
    (folder / "folder.jsonl").mkdir()
    paths["directory"] = str(folder / "folder.jsonl")
    return paths


@pytest.fixture
def cli_env(run_env, tmp_path):
    # datasets' cache stays in the test's folder
    return dict(run_env, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))


# case -> (file, recipe keys, what the one-line error must say); rows count from 0, lines from 1
CASES = {
    "latin1_jsonl": (
        "latin1_jsonl",
        {},
        [_where(LATIN1_JSONL, 0xE9) + " in the file) is not UTF-8", "iconv -f latin1 -t utf-8"],
    ),
    "latin1_csv": ("latin1_csv", {}, ["line 3, column 4: byte 0xe9 (offset 30", "iconv -f latin1 -t utf-8"]),
    "latin1_json_array": ("latin1_json_array", {}, [_where(LATIN1_ARRAY, 0xEF), "iconv -f latin1 -t utf-8"]),
    "utf16_jsonl": ("utf16_jsonl", {}, ["line 1, column 1: byte 0xff", "iconv -f utf-16 -t utf-8"]),
    "over_limit": (
        "over_limit",
        {"max_row_bytes": LIMIT},
        [
            f"line 2 (starting at byte offset {len(GOOD) + 1}): longer than max_row_bytes={LIMIT}",
            "raise max_row_bytes (recipe key or --max_row_bytes)",
        ],
    ),
    "parquet_over_limit": (
        "parquet_over_limit",
        {"max_row_bytes": LIMIT},
        [
            f"split 'train', row 2: {OVER_LIMIT_TEXT} bytes of text in column(s) messages, more "
            f"than max_row_bytes={LIMIT}"
        ],
    ),
    "array_over_limit": (
        "array_over_limit",
        {"max_row_bytes": LIMIT},
        [f"split 'train', row 1: {OVER_LIMIT_TEXT} bytes of text", f"max_row_bytes={LIMIT}"],
    ),
    "malformed_jsonl": ("malformed_jsonl", {}, ["line 3: not valid JSON", "cut short", "fix or remove that line"]),
    "not_object_jsonl": ("not_object_jsonl", {}, ["line 2: a JSON list, not an object"]),
    "empty": ("empty", {}, ["has no rows (the file is empty)"]),
    "directory": ("directory", {}, ["is a directory", "not a file"]),
    "max_row_bytes_0": ("at_limit_crlf", {"max_row_bytes": 0}, ["max_row_bytes: got 0, but it must be at least 1"]),
    "max_row_bytes_negative": ("at_limit_crlf", {"max_row_bytes": -5}, ["max_row_bytes: got -5"]),
}
# each costs a `posttrain` start (~10 s on a busy 2-core machine); the others run in-process only
# (a bad max_row_bytes on the command line is refused by the recipe layer, naming its source: tests/test_bad_input.py)
CLI_CASES = ["latin1_jsonl", "latin1_csv", "over_limit", "parquet_over_limit", "malformed_jsonl", "empty", "directory"]


def _argv(path, output_dir, keys=None):
    extra = [item for key, value in (keys or {}).items() for item in (f"--{key}", str(value))]
    return ["train", "sft/tiny", "--dataset", path, "--output_dir", str(output_dir), "--max_steps", "1", *extra]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_files_raise_one_line(files, case, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    name, keys, messages = CASES[case]
    with pytest.raises(DataError) as info:
        load_task_datasets("sft", DataArguments(dataset=files[name], **keys))
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in messages), message
    assert case.startswith("max_row_bytes") or f"dataset '{files[name]}'" in message, message  # the file is named


def test_rows_at_the_bound_load(files, tmp_path, monkeypatch):
    # a row of exactly max_row_bytes, in a file with "\r\n" line ends: not an off-by-one
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    train = load_task_datasets("sft", DataArguments(dataset=files["at_limit_crlf"], max_row_bytes=LIMIT))["train"]
    assert len(train) == 3


def test_bad_data_files_fail_in_one_line_on_the_command_line(files, cli_env, tmp_path):
    cases = {case: _argv(files[CASES[case][0]], tmp_path / case, CASES[case][1]) for case in CLI_CASES}
    results = run_cli_cases(cases, cli_env, tmp_path)
    for case, proc in results.items():
        for message in CASES[case][2]:
            try:
                assert_one_line_error(proc, message)
            except AssertionError as error:
                raise AssertionError(f"case {case}: {error}") from None


def test_big_row_fails_fast_with_bounded_memory(files, cli_env, tmp_path):
    # Before the bound, rows of 1 and 2 MiB added 0.26 and 0.5 GB of peak memory and 1.5 and 9 s to a run, so
    # an 8 MiB one ~2 GB (a 60 MB row took 190 s and 19 GB); now the scan stops 1 MiB into it. A `posttrain
    # train` that stops at the data peaks at ~0.5 GB (importing torch and TRL).
    # RUSAGE_CHILDREN's maxrss is the largest of all children this process waited for: an upper bound of this one.
    start = time.monotonic()
    proc = run_cli_cases({"big": _argv(files["big_row"], tmp_path / "big")}, cli_env, tmp_path)["big"]
    elapsed = time.monotonic() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    try:
        assert_one_line_error(
            proc, f"line 2 (starting at byte offset {len(GOOD) + 1}): longer than max_row_bytes={DEFAULT_MAX_ROW_BYTES}"
        )
    finally:
        print(f"8 MiB row: {elapsed:.1f} s, peak RSS of children {peak_mb:.0f} MB", file=sys.stderr)
    assert elapsed < 90, elapsed  # ~6-10 s on a loaded 2-core machine, most of it importing torch
    assert peak_mb < 1200, peak_mb


# ------------------------------------------------------------------------------------------ the scan, in-process


def _reference(data: bytes, limit):
    """The first fault found on the whole buffer at once: what scan_text_file must find reading in chunks."""
    try:
        data.decode("utf-8")
        bad = None
    except UnicodeDecodeError as error:
        bad = error.start
    checked = data if bad is None else data[:bad]
    start = 0
    for number, line in enumerate(checked.split(b"\n"), start=1):
        if limit is not None and len(line) - line.endswith(b"\r") > limit:
            return TextFault("row_size", number, start)
        start += len(line) + 1
    if bad is None:
        return None
    line_start = data.rfind(b"\n", 0, bad) + 1
    return TextFault("encoding", data.count(b"\n", 0, bad) + 1, bad, bad - line_start + 1, data[bad])


def _scan(tmp_path, data: bytes, limit=None, chunk_bytes=4):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    return scan_text_file(str(path), limit, chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 5, 7, 1 << 20])
@pytest.mark.parametrize(
    "data, limit, expected",
    [
        (b"\xe9abc\n", None, TextFault("encoding", 1, 0, 1, 0xE9)),  # first byte of the file
        (b"ab\ncd\xe9f\n", None, TextFault("encoding", 2, 5, 3, 0xE9)),  # mid line
        (b"ab\ncd\n\xff", None, TextFault("encoding", 3, 6, 1, 0xFF)),  # last byte of the file
        (b"ab\ncaf\xc3", None, TextFault("encoding", 2, 6, 4, 0xC3)),  # a character cut short by the end of the file
        (b"a\xe2\x82\n", None, TextFault("encoding", 1, 1, 2, 0xE2)),  # ... or by the end of its line
        ("é€😀\né€😀".encode(), None, None),  # 2-, 3- and 4-byte characters: split across every read size
        ("é€😀\né€😀".encode(), 9, None),  # exactly the bound
        ("é€😀\né€😀x".encode(), 9, TextFault("row_size", 2, 10)),  # one byte over
        (b"abcd\r\nabcd\r\n", 4, None),  # "\r\n" is not part of the row
        (b"abcd\r\nabcde\r\nab", 4, TextFault("row_size", 2, 6)),
        (b"abcd\r\nab\xe9d\r\n", 4, TextFault("encoding", 2, 8, 3, 0xE9)),
        (b"ab\rcd\n", 4, TextFault("row_size", 1, 0)),  # a lone "\r" is content
        (b"abcd\r", 4, None),  # a last line ending in "\r" without "\n"
        (b"abcdefgh\n\xe9", 4, TextFault("row_size", 1, 0)),  # the first fault in the file wins
    ],
)
def test_scan_finds_the_first_fault(tmp_path, data, limit, expected, chunk_bytes):
    assert _reference(data, limit) == expected  # the reference agrees with the hand-written answer
    assert _scan(tmp_path, data, limit, chunk_bytes) == expected


def test_scan_matches_the_reference_on_random_bytes(tmp_path):
    pieces = [
        b"a",
        b"bc",
        b"\n",
        b"\r\n",
        b"\r",
        "é".encode(),
        "€".encode(),
        "😀".encode(),
        b"\xe9",
        b"\xc3",
        b"\xe2\x82",
        b"\xff",
    ]
    rng = random.Random(0)
    for trial in range(400):
        weights = [30, 30, 8, 8, 2, 10, 10, 10] + [1 if trial % 3 else 0] * 4  # a third of the inputs are valid
        data = b"".join(rng.choices(pieces, weights, k=rng.randint(0, 40)))
        limit = rng.choice([None, 1, 3, 6, 12])
        for chunk_bytes in (1, 2, 3, 5, 64):
            assert _scan(tmp_path, data, limit, chunk_bytes) == _reference(data, limit), (data, limit, chunk_bytes)


def test_scan_of_a_long_line_stops_early(tmp_path, monkeypatch):
    # the bound is checked per read: a 64 MiB line is abandoned after the read that passes the bound
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as file:
        file.write(b"{}\n")
        for _ in range(64):
            file.write(b"x" * (1 << 20))
    reads = []

    class Counting:
        def __init__(self, *args):
            self.file = open(*args)

        def read(self, size):
            reads.append(size)
            return self.file.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files_module, "open", Counting, raising=False)  # the module's, not builtins'

    assert scan_text_file(str(path), 1 << 20) == TextFault("row_size", 2, 3)
    assert len(reads) <= 2, len(reads)


def test_first_bad_json_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"a": 2}\n{"a": \n')  # a byte-order mark, blank lines
    assert first_bad_json_line(str(path)) == (
        5,
        "not valid JSON (Expecting value at the end of the line: is it cut short?)",
    )
    path.write_bytes(b'{"a": 1}\n{"a" 1}\n')
    assert first_bad_json_line(str(path)) == (2, "not valid JSON (Expecting ':' delimiter at character 6)")
    path.write_bytes(b'{"a": 1}\n"text"\n')
    assert first_bad_json_line(str(path))[0] == 2
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n')
    assert first_bad_json_line(str(path)) is None


# --------------------------------------------------------------------------------------- row size after loading


def test_text_bytes_counts_nested_strings():
    messages = pa.array(
        [
            [{"role": "user", "content": "abc"}, {"role": "a", "content": None}],
            None,
            [],
            [{"role": "xy", "content": "é"}],
        ]
    )
    assert loading._text_bytes(messages).tolist() == [8, 0, 0, 4]
    assert loading._text_bytes(messages.slice(1)).tolist() == [0, 0, 4]  # a slice keeps its own rows
    assert loading._text_bytes(pa.chunked_array([messages.slice(0, 2), messages.slice(2)])).tolist() == [8, 0, 0, 4]
    assert loading._text_bytes(pa.array(["ab", None, "ç"], pa.large_string())).tolist() == [2, 0, 2]
    assert loading._text_bytes(pa.array([1, 2])).tolist() == [0, 0]


def test_row_size_bound_names_the_row_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(loading, "_BATCH_SIZE", 4)  # the bad row in the third batch
    rows = [{"prompt": "p", "completion": "c"}] * 9 + [{"prompt": "p" * 50, "completion": "c" * 51}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    args = DataArguments(dataset=str(tmp_path / "rows.parquet"), max_row_bytes=100)
    with pytest.raises(DataError, match=r"split 'train', row 9: 101 bytes of text in column\(s\) prompt, completion"):
        load_task_datasets("sft", args)
    assert len(load_task_datasets("sft", DataArguments(dataset=args.dataset, max_row_bytes=101))["train"]) == 10
    # 0 is refused; the default is 1 MiB
    with pytest.raises(DataError, match="max_row_bytes: got 0, but it must be at least 1"):
        DataArguments(dataset=args.dataset, max_row_bytes=0)
    assert DataArguments().max_row_bytes == DEFAULT_MAX_ROW_BYTES == 1 << 20

"""Checks of a local text data file (.jsonl, .json, .csv) on its bytes, before ``datasets`` parses it.

``datasets`` reports a non-UTF-8 byte as a UnicodeDecodeError traceback from inside pyarrow when the rows are
first read (JSON Lines) or as a "position 3" within some read block (CSV, JSON), never the line. And it reads
a line whole however long it is: one 60 MB JSONL row took 190 s and 19 GB of memory before training started
(tokenising text costs about 300 bytes of memory per byte). ``scan_text_file`` reads the file once, in binary
chunks of bounded size, and returns the first such fault with its line and byte offset, so the error names
them before any parsing starts. It reads about 400 MB/s from the page cache, 800 MB/s for ASCII (which
needs no decoding), on a busy 2-core machine: a second or two for a large SFT set, on every run.

``first_bad_json_line`` is only called after ``datasets`` failed on a JSON Lines file: pyarrow's message
counts rows within a read block, so it does not say which line of a large file is broken.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import NamedTuple, Optional

from .args import DataError

CHUNK_BYTES = 1 << 20  # what one read holds in memory, whatever the length of the lines


def check_text_file(path: str, resolved: str, max_row_bytes: int) -> None:
    """Raise DataError naming the line of the first non-UTF-8 byte or over-long line of ``resolved``.

    ``path`` is the file as the user wrote it, for the message. A JSON array file is turned into rows whole by
    datasets, so its lines are not rows: only its encoding is checked here (its rows' size once loaded).
    """
    bound = None if is_json_array(resolved) else max_row_bytes
    try:
        fault = scan_text_file(resolved, bound)
    except OSError as error:  # permission denied, I/O error
        raise DataError(f"dataset '{path}': could not read the file: {error}; check its permissions") from error
    if fault is None:
        return
    if fault.kind == "row_size":
        raise DataError(
            f"dataset '{path}', line {fault.line} (starting at byte offset {fault.offset}): longer than "
            f"max_row_bytes={bound} "
            "bytes, stopped there before reading it whole (tokenising a row costs about 300 bytes of memory per "
            "byte); remove or split that row, or raise max_row_bytes (recipe key or --max_row_bytes) above its "
            "length if rows this long are intended"
        )
    with open(resolved, "rb") as file:
        utf16 = file.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    fixed = "fixed" + os.path.splitext(path)[1]
    how = (
        f"it starts with a UTF-16 byte-order mark: convert it with `iconv -f utf-16 -t utf-8 {path} > {fixed}`"
        if utf16
        else f"re-encode it, e.g. `iconv -f latin1 -t utf-8 {path} > {fixed}` if it is Latin-1 "
        "(cp1252 for Windows files), or fix that line"
    )
    raise DataError(
        f"dataset '{path}', line {fault.line}, column {fault.column}: byte 0x{fault.byte:02x} (offset {fault.offset} "
        f"in the file) is not UTF-8, and data files must be UTF-8 text; {how}"
    )


def is_json_array(resolved: str) -> bool:
    """What datasets' json loader checks: a file starting with "[" (after a UTF-8 byte-order mark) is one JSON
    array of rows, anything else JSON Lines."""
    with open(resolved, "rb") as file:
        head = file.read(len(codecs.BOM_UTF8) + 1)
    return head.removeprefix(codecs.BOM_UTF8).startswith(b"[")


class TextFault(NamedTuple):
    kind: str  # "encoding": a byte that is not UTF-8; "row_size": a line longer than the bound
    line: int  # counted from 1, as editors do
    offset: int  # byte offset in the file of the bad byte, or of the first byte of the long line
    column: int = 0  # encoding: the bad byte's column in its line, in bytes from 1
    byte: int = 0  # encoding: the bad byte's value


def scan_text_file(path: str, max_row_bytes: Optional[int], chunk_bytes: int = CHUNK_BYTES) -> Optional[TextFault]:
    """The first byte of ``path`` that is not UTF-8 or line longer than ``max_row_bytes`` (None: no bound).

    One pass with bounded memory: a line is never held whole, only its length so far, so a 60 MB line costs
    no more than a short one and the scan stops as soon as the bound is passed. A line's length excludes its
    "\\n" or "\\r\\n". A multi-byte character split across two reads is not a fault: the incremental decoder
    keeps its first bytes for the next read. Returns None for a clean file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, line_start, line_len = 1, 0, 0  # the line being read: number, offset of its first byte, bytes so far
    offset, last_cr, held = 0, False, b""  # file offset of `data`; was the byte before it "\r"; see below
    with open(path, "rb") as file:
        while True:
            chunk = file.read(chunk_bytes)
            # `data`: the bytes of this read known to be UTF-8, after those `held` back from the previous read
            # (a character begun there); bytes are checked for length only once valid, so that the first fault
            # in the file is the one reported whatever the read size
            data, bad = held + chunk, None
            if held or not chunk.isascii():  # ASCII needs no decoding
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:  # its position counts from the first held byte
                    bad, bad_byte, data = offset + error.start, data[error.start], data[: error.start]
                else:
                    pending = len(decoder.getstate()[0])
                    held, data = data[len(data) - pending :], data[: len(data) - pending]
            parts = data.split(b"\n")  # parts[0] continues the open line, parts[-1] is the new open line
            if max_row_bytes is not None:
                longest = max(line_len + len(parts[0]), max(map(len, parts[1:]), default=0))
                if longest > max_row_bytes:  # maybe: these lengths include a "\r" before "\n"
                    fault = _long_line(parts, max_row_bytes, line, line_start, line_len, offset, last_cr)
                    if fault is not None:
                        return fault
            if len(parts) > 1:
                line += len(parts) - 1
                line_start, line_len = offset + len(data) - len(parts[-1]), len(parts[-1])
            else:
                line_len += len(data)
            if bad is not None:
                return TextFault("encoding", line, bad, bad - line_start + 1, bad_byte)
            if not chunk:
                return None
            if data:
                offset, last_cr = offset + len(data), data.endswith(b"\r")


def _long_line(parts, limit, line, start, length, offset, last_cr) -> Optional[TextFault]:
    # The exact walk over one read, only when a line may be too long: a line of limit + 1 bytes whose last
    # byte is the "\r" of a "\r\n" is not (the open line's "\r" may be followed by "\n" in the next read).
    position = offset
    for i, part in enumerate(parts):
        length += len(part)
        cr = part.endswith(b"\r") if part else (i == 0 and last_cr)
        if length - cr > limit:
            return TextFault("row_size", line, start)
        position += len(part) + 1
        line, start, length = line + 1, position, 0
    return None


def first_bad_json_line(path: str) -> Optional[tuple[int, str]]:
    """(line, problem) of the first line of a JSON Lines file that is not one JSON object, or None.

    Blank lines are skipped, as pyarrow does. Only called once the file has passed ``scan_text_file``, so
    its lines are UTF-8 and no longer than the row bound.
    """
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")  # -sig: a byte-order mark
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                cut = error.pos >= len(text)
                where = "the end of the line: is it cut short?" if cut else f"character {error.pos + 1}"
                return number, f"not valid JSON ({error.msg} at {where})"
            if not isinstance(value, dict):
                return number, f'a JSON {type(value).__name__}, not an object ({{"column": value, ...}})'
    return None

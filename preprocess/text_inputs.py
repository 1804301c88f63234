"""The text converter's inputs as documents: JSON lines, tables with a text column and plain text (runs of lines,
or one document a line), each input read in the format its name says, and the checks that refuse a wrong input
before the tokenizer loads (a missing text field or column, a binary format under a text file's name).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.input_records import (
    BAD_RECORD,
    COMPRESSIONS,
    BadRecord,
    InputError,
    decode_text,
    is_valid_utf8,
    open_input,
    split_compression,
)
from preprocess.readers import detect_format, first_records, input_blocks, table_columns
from preprocess.table_readers import TABLE_SUFFIXES

MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
NOT_UTF8 = "not_utf8"
EMPTY_TEXT = "empty_text"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PLAIN_TEXT = "text"  # the format of inputs that are neither JSON lines nor tables
# Suffixes of archives and compressions not read: refused by name rather than tokenized as bytes.
UNREAD_SUFFIXES = (".tar", ".tgz", ".zip", ".7z", ".rar", ".lz4", ".lzo", ".lzma", ".br", ".sz", ".snappy", ".z")
# Magic bytes of formats a line file may really be under a wrong name: (magic, what it is, the fix's suffix:
# appended for a compression this converter reads, replacing the name's suffix for a table, None: unpack it).
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data", ".gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", ".zst"),
    (b"BZh", "bzip2-compressed data", ".bz2"),
    (b"\xfd7zXZ\x00", "xz-compressed data", ".xz"),
    (b"PAR1", "a Parquet file", ".parquet"),
    (b"ARROW1", "an Arrow IPC file", ".arrow"),
    (b"PK\x03\x04", "a zip archive", None),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive", None),
    (b"\x04\x22\x4d\x18", "lz4-compressed data", None),
)
PROBE_RECORDS = 100  # first JSON lines read before the tokenizer loads, to find a wrong --text-field
PROBE_BYTES = 4096  # first (decompressed) bytes of a line file checked for a binary format


@dataclass(frozen=True, slots=True)
class Document:
    """One input document: its text, or why it is skipped (``where`` = file:line or file:row for messages)."""

    where: str
    text: str | None = None
    skip: str | None = None


def _checked(where: str, text: str) -> Document:
    """The document, or its skip reason when its text is not UTF-8 or blank."""
    if not is_valid_utf8(text):
        return Document(where, skip=NOT_UTF8)
    if not text.strip():
        return Document(where, skip=EMPTY_TEXT)
    return Document(where, text)


def describe_text_formats() -> str:
    """The formats read, for the error that refuses an archive."""
    compressions = "/".join(COMPRESSIONS)
    return (
        f"JSON lines ({'/'.join(JSONL_SUFFIXES)}) and plain text (any other name), optionally {compressions}; "
        ".parquet, .arrow, a datasets.save_to_disk directory or a directory of .parquet/.arrow files"
    )


def input_format(path: str) -> str:
    """How one input is read: ``jsonl``, ``parquet``/``arrow``/``hf`` (tables) or ``text``, from its suffix
    (directories: their contents); InputError for an archive or compression that is not read."""
    if Path(path).is_dir():
        return detect_format([path])
    stem, compression = split_compression(path)
    suffix = Path(stem).suffix.lower()
    if suffix in UNREAD_SUFFIXES:
        raise InputError(
            f"{path}: {suffix}{compression or ''} files are not read; unpack it first. Read: {describe_text_formats()}"
        )
    if suffix in TABLE_SUFFIXES:
        return detect_format([path])  # refuses a compressed table file
    return "jsonl" if suffix in JSONL_SUFFIXES else PLAIN_TEXT


def read_plain_text(path: str | Path, doc_per_line: bool = False) -> Iterator[Document]:
    """Documents of a plain text file (decompressed by suffix): runs of non-blank lines, or every non-blank line
    with ``doc_per_line``; invalid UTF-8 is kept as surrogates, so it is counted as ``not_utf8``."""
    name = Path(path).name
    lines: list[str] = []
    start = 1
    with open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_text(raw).rstrip("\r\n")
            if not line.strip():
                if lines:
                    yield _checked(f"{name}:{start}", "\n".join(lines))
                    lines = []
            elif doc_per_line:
                yield _checked(f"{name}:{lineno}", line)
            else:
                if not lines:
                    start = lineno
                lines.append(line)
    if lines:
        yield _checked(f"{name}:{start}", "\n".join(lines))


def record_document(where: str, record: dict[str, Any] | BadRecord, text_field: str) -> Document:
    """The document of one JSON line or table row, or its skip reason."""
    if isinstance(record, BadRecord):
        return Document(where, skip=BAD_RECORD)
    if text_field not in record:
        return Document(where, skip=MISSING_FIELD)
    if not isinstance(record[text_field], str):
        return Document(where, skip=NOT_A_STRING)
    return _checked(where, record[text_field])


def read_documents(
    paths: Sequence[str | Path], text_field: str = "text", doc_per_line: bool = False
) -> Iterator[Document]:
    """All documents of the inputs in order, each input read in its ``input_format``."""
    for path in map(str, paths):
        fmt = input_format(path)
        if fmt == PLAIN_TEXT:
            yield from read_plain_text(path, doc_per_line)
            continue
        for block in input_blocks([path], fmt, columns=[text_field]):
            for where, record in block.read():
                yield record_document(where, record, text_field)


def count_documents(paths: Sequence[str | Path], text_field: str) -> int | None:
    """The documents of the inputs where every input records its rows up front (Parquet footers), else None."""
    total = 0
    for path in map(str, paths):
        fmt = input_format(path)
        if fmt in ("jsonl", PLAIN_TEXT):
            return None
        for block in input_blocks([path], fmt, columns=[text_field]):
            if block.rows is None:
                return None
            total += block.rows
    return total


def _check_head(path: str, kind: str) -> None:
    """InputError when a line file's first (decompressed) bytes are not UTF-8 but a known binary format."""
    try:
        with open_input(path) as f:
            head = f.read(PROBE_BYTES)
    except Exception as e:  # each decompressor raises its own error types for a damaged or mislabeled file
        raise InputError(f"{path}: unreadable: {e}") from None
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return
    except UnicodeDecodeError:
        pass
    for magic, what, fix in MAGIC:
        if head.startswith(magic):
            name = Path(path).name
            if fix is None:
                todo = "unpack it first"
            elif fix in TABLE_SUFFIXES:
                todo = f"rename it to {Path(name).with_suffix(fix)}"
            else:
                todo = f"rename it to {name}{fix}"
            raise InputError(f"{path}: looks like {what}, not {kind}; {todo}")


def check_inputs(paths: Sequence[str | Path], text_field: str) -> None:
    """InputError for the mistakes that would otherwise be found only after a whole run skipped every document,
    checked in seconds on the first input of each format: a table without the text column, JSON lines whose
    first records lack the field (naming the fields they have), a line file holding a compressed or binary
    format under another name, an archive or compression that is not read."""
    firsts: dict[str, str] = {}
    for path in map(str, paths):
        firsts.setdefault(input_format(path), path)
    for fmt, path in firsts.items():
        if fmt == PLAIN_TEXT:
            _check_head(path, "plain text")
        elif fmt == "jsonl":
            _check_head(path, "JSON lines")
            records = [r for _, r in first_records(input_blocks([path], fmt), PROBE_RECORDS)]
            objects = [r for r in records if not isinstance(r, BadRecord)]
            if objects and not any(text_field in r for r in objects):
                fields = sorted({k for r in objects for k in r})
                raise InputError(
                    f"{path}: no field {text_field!r} in the first {len(records)} records; fields present: "
                    f"{fields} (choose one with --text-field)"
                )
        else:
            columns = table_columns([path], fmt)
            if text_field not in columns:
                raise InputError(
                    f"{path}: no column {text_field!r}; columns present: {columns} (choose one with --text-field)"
                )

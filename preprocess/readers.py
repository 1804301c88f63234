"""Input readers: the forms users' data arrives in -> one stream of ``(source id, record)`` per input.

A record is a dict of fields (values as stored: ``str``, ``bytes``, numbers, lists, nested dicts such as the
Hugging Face ``Image`` struct ``{"bytes", "path"}``), or a ``BadRecord`` for an input unit that could not be
parsed (a bad JSON line, a damaged tar member): readers never raise on one bad record, the converters count it.
A problem with the input as a whole (unknown format, a field that does not exist) raises ``InputError`` with one
line naming the file and what to do; converters print it and exit before loading a tokenizer or codebook.

Formats (``detect_format`` picks one from the paths; ``--format`` overrides):

* ``webdataset``: tar shards as img2dataset writes them (``key.jpg`` + ``key.txt`` + ``key.json``), local paths,
  globs, brace ranges (``shards/{00000..00999}.tar``) and ``pipe:`` URLs, read with the ``webdataset`` package. A
  record holds every member of a key by extension (``txt`` decoded) and the fields of its ``.json``; the source
  id is ``<tar name>/<key>``. Each tar is one *block*: a converter can skip another machine's tars unopened.
* ``parquet`` / ``arrow``: files, or directories of them (a Hugging Face hub cache); ``hf``: a
  ``datasets.save_to_disk`` directory, read with ``datasets``. Rows are read in record batches, only the
  columns asked for.
* ``coco``: COCO caption annotations (``images`` + ``annotations``): one record per image with all its captions
  (``file_name``, ``captions``, ``id``).
* ``jsonl``, ``csv``, ``tsv``: one record per line (a header row names the fields unless ``columns`` are given).

Every line-oriented format may be compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``.

This module picks the format and makes one stream of blocks over all inputs; the readers of each format family
are ``preprocess/line_readers.py``, ``preprocess/table_readers.py`` and ``preprocess/tar_reader.py``, what they
yield is ``preprocess/input_records.py``'s.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocess.input_records import InputError, Record, split_compression
from preprocess.line_readers import LINE_SUFFIXES, is_coco, read_coco, read_delimited, read_jsonl
from preprocess.shards import ShardInput
from preprocess.table_readers import (
    TABLE_SUFFIXES,
    directory_format,
    hf_dataset,
    read_hf,
    read_table,
    table_files,
    table_rows_count,
    table_schema,
)
from preprocess.tar_reader import read_tar, tar_rows

FORMATS = ("webdataset", "parquet", "arrow", "hf", "coco", "jsonl", "csv", "tsv")


def describe_formats() -> str:
    """The formats read, for the error that names an unreadable input."""
    return (
        "webdataset .tar (globs, {a..b} ranges, pipe:), .parquet, .arrow, a datasets.save_to_disk directory, "
        "a directory of .parquet files, COCO caption .json, .jsonl/.csv/.tsv (optionally .gz/.bz2/.xz/.zst)"
    )


# ---- which files, in which format ------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files, directories and URLs named by the patterns, in order (globs sorted, ``{a..b}`` ranges expanded).

    A local pattern matching nothing is an InputError; ``pipe:`` and other URLs are passed through."""
    import braceexpand

    paths: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            if "://" in expanded or expanded.startswith("pipe:"):
                paths.append(expanded)
                continue
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            found = [m for m in matches if Path(m).exists()]
            if not found:
                raise InputError(f"--input {expanded!r}: no such file or directory")
            paths.extend(found)
    return paths


def detect_format(paths: Sequence[str], forced: str | None = None) -> str:
    """The one format of all inputs (``forced`` when given); InputError naming what is read otherwise."""
    if forced:
        if forced not in FORMATS:
            raise InputError(f"--format {forced!r}: unknown; one of {', '.join(FORMATS)}")
        return forced
    formats = {p: _format_of(p) for p in paths}
    kinds = set(formats.values())
    if len(kinds) > 1:
        raise InputError(f"--input mixes formats {sorted(kinds)}; convert each format in its own run")
    return kinds.pop()


def _format_of(path: str) -> str:
    if Path(path).is_dir():
        return directory_format(path)
    stem, compression = split_compression(path)
    lower = stem.lower()
    if lower.endswith(".tar"):
        if compression:
            raise InputError(f"{path}: compressed tars are not read; read: {describe_formats()}")
        return "webdataset"
    for suffix, kind in TABLE_SUFFIXES.items():
        if lower.endswith(suffix):
            if compression:
                raise InputError(f"{path}: {suffix} files carry their own compression; decompress it first")
            return kind
    for suffix, kind in LINE_SUFFIXES.items():
        if lower.endswith(suffix):
            return "coco" if suffix == ".json" and is_coco(path) else kind
    raise InputError(f"{path}: unknown input format; read: {describe_formats()}")


# ---- one stream over all inputs --------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A unit of input that a converter can skip without reading: one tar, or one whole file."""

    name: str
    read: Callable[[], Iterator[Record]]
    rows: int | None = None  # records, where known without reading (Parquet footers)
    read_range: Callable[[int, int], Iterator[Record]] | None = None  # records [start, stop), reading no others


def input_blocks(
    paths: Sequence[str], fmt: str, columns: Sequence[str] | None = None, header: Sequence[str] | None = None
) -> list[Block]:
    """One Block per input unit, in input order; the block names (which prefix the sample ids) must be unique.
    ``columns``: the fields to read from tables (all of them when None); ``header``: the field names of CSV/TSV
    files that have no header row (``--columns``)."""
    blocks: list[Block] = []
    for path in paths:
        if fmt == "webdataset":
            blocks.append(Block(Path(path).name, lambda p=path: read_tar(p), tar_rows(path)))
        elif fmt in ("parquet", "arrow"):
            files = table_files(path)
            if not files:
                raise InputError(f"{path}: no .{fmt} files")
            for f in files:
                name = Path(f).relative_to(path).as_posix() if Path(path).is_dir() else Path(f).name
                fields = columns or table_schema(f).names
                blocks.append(
                    Block(
                        name,
                        lambda f=f, n=name, c=fields: read_table(f, c, n),
                        table_rows_count(f),
                        lambda a, b, f=f, n=name, c=fields: read_table(f, c, n, a, b),
                    )
                )
        elif fmt == "hf":
            rows = hf_dataset(path).num_rows
            blocks.append(
                Block(Path(path).name, lambda p=path: read_hf(p, columns or hf_dataset(p).column_names), rows)
            )
        elif fmt == "coco":  # parsed once, up front: the whole file is one JSON document anyway
            records = list(read_coco(path))
            blocks.append(Block(Path(path).name, lambda r=records: iter(r), len(records)))
        elif fmt == "jsonl":
            blocks.append(Block(Path(path).name, lambda p=path: read_jsonl(p)))
        else:
            delimiter = "," if fmt == "csv" else "\t"
            blocks.append(Block(Path(path).name, lambda p=path, d=delimiter: read_delimited(p, d, header)))
    names = [b.name for b in blocks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"input file names must be unique (they form the sample ids): {dup}")
    return blocks


def table_columns(paths: Sequence[str], fmt: str) -> list[str] | None:
    """The column names of the first table input (None for formats without a schema up front)."""
    if fmt in ("parquet", "arrow"):
        return list(table_schema(table_files(paths[0])[0]).names)
    if fmt == "hf":
        return list(hf_dataset(paths[0]).column_names)
    return None


def row_range_shards(blocks: Sequence[Block], size: int) -> list[ShardInput] | None:
    """Shard k = records [k * size, (k + 1) * size) of the blocks in order, each read only when loaded (so a
    machine reads only its own shards' rows), or None unless every block knows its rows and can read a range.
    The records are exactly those of reading the blocks in order and cutting every `size`."""
    if not blocks or any(b.rows is None or b.read_range is None for b in blocks):
        return None
    starts = list(itertools.accumulate((b.rows for b in blocks), initial=0))
    shards = []
    for first in range(0, starts[-1], size):
        last = min(first + size, starts[-1])
        pieces = [
            (b, max(first, s) - s, min(last, s + b.rows) - s)
            for b, s in zip(blocks, starts)
            if s < last and s + b.rows > first
        ]
        shards.append(ShardInput(first, lambda pieces=pieces: [r for b, a, z in pieces for r in b.read_range(a, z)]))
    return shards


def first_records(blocks: Sequence[Block], count: int) -> list[Record]:
    """The first ``count`` records of the inputs (for the start-up probe; reads no further)."""
    return list(itertools.islice(itertools.chain.from_iterable(b.read() for b in blocks), count))


__all__ = [
    "FORMATS",
    "Block",
    "InputError",
    "describe_formats",
    "detect_format",
    "expand_inputs",
    "first_records",
    "input_blocks",
    "row_range_shards",
    "table_columns",
]

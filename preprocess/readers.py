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
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from preprocess.common import ShardInput

FORMATS = ("webdataset", "parquet", "arrow", "hf", "coco", "jsonl", "csv", "tsv")
COMPRESSIONS: dict[str, Callable[[str], IO[bytes]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zst": lambda path: _zstd_open(path),
}
LINE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BATCH_ROWS = 1024  # table rows decoded at a time


class InputError(ValueError):
    """The input as a whole cannot be read as asked (format, missing field): one line, before any heavy work."""


@dataclass(frozen=True)
class BadRecord:
    """An input record that could not be parsed; converters count it as skip reason ``bad_record``."""

    where: str
    error: str


Record = tuple[str, "dict[str, Any] | BadRecord"]


def _zstd_open(path: str) -> IO[bytes]:
    import zstandard

    return io.BufferedReader(zstandard.open(path, "rb"))  # the raw reader cannot iterate lines


def describe_formats() -> str:
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


def split_compression(path: str) -> tuple[str, str | None]:
    """('data.jsonl', '.zst') for 'data.jsonl.zst'; (path, None) when it is not compressed."""
    lower = path.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, None


def open_input(path: str | Path) -> IO[bytes]:
    """A binary reader of the file's contents, decompressed by its suffix."""
    _, compression = split_compression(str(path))
    return COMPRESSIONS[compression](str(path)) if compression else open(path, "rb")


COCO_KEYS = ("info", "licenses", "images", "annotations", "categories")


def _is_coco(path: str) -> bool:
    """A COCO annotation file is one JSON object whose first key is one of COCO's top-level keys (it is often a
    single line, so the first line alone cannot tell it from JSON lines; ``--format jsonl`` overrides)."""
    with open_input(path) as f:
        head = f.read(4096).decode("utf-8", "replace")
    match = re.match(r'\s*\{\s*"([^"]*)"', head)
    return bool(match) and match.group(1) in COCO_KEYS


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
    local = Path(path)
    if local.is_dir():
        if (local / "dataset_info.json").is_file() or (local / "state.json").is_file():
            return "hf"
        for suffix, kind in TABLE_SUFFIXES.items():
            if any(local.rglob(f"*{suffix}")):
                return kind
        raise InputError(f"{path}: a directory with no .parquet or .arrow files and no datasets.save_to_disk layout")
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
            return "coco" if suffix == ".json" and _is_coco(path) else kind
    raise InputError(f"{path}: unknown input format; read: {describe_formats()}")


# ---- line-oriented formats -------------------------------------------------------------------------


def _decode(raw: bytes) -> str:
    """UTF-8 with surrogateescape: invalid bytes survive as lone surrogates, so a converter can count a
    non-UTF-8 field as its own skip reason instead of losing the whole record."""
    return raw.decode("utf-8", "surrogateescape")


def is_valid_utf8(text: str) -> bool:
    """False for text carrying lone surrogates (invalid bytes read by this module, or JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: str) -> Iterator[Record]:
    """(``file:line``, object or BadRecord); blank lines are not records."""
    name = Path(path).name
    with open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(_decode(raw))
            except json.JSONDecodeError as e:
                yield where, BadRecord(f"{path}:{lineno}", f"invalid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield where, BadRecord(f"{path}:{lineno}", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield where, obj


def read_delimited(path: str, delimiter: str, columns: Sequence[str] | None = None) -> Iterator[Record]:
    """CSV (quoted fields as the csv module reads them) or TSV (no quoting); the first row names the fields
    unless ``columns`` are given (files without a header)."""
    name = Path(path).name
    with open_input(path) as raw, io.TextIOWrapper(raw, "utf-8", "surrogateescape", newline="") as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        rows = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns else next(rows, None)
        if not header or header == [""]:
            raise InputError(f"{path}: empty file, expected a header row naming the fields (or pass --columns)")
        for row in rows:
            lineno = rows.line_num
            if not any(v.strip() for v in row):
                continue
            where = f"{name}:{lineno}"
            if len(row) != len(header):
                yield where, BadRecord(f"{path}:{lineno}", f"{len(row)} fields, expected {len(header)} ({header})")
                continue
            yield where, dict(zip(header, row))


def read_coco(path: str) -> Iterator[Record]:
    """One record per image of a COCO caption file: ``{"id", "file_name", "captions": [...]}`` (in the order of
    ``images``); an annotation naming an image that is not listed is a BadRecord."""
    name = Path(path).name
    with open_input(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not a COCO annotation file: invalid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: a COCO caption file holds 'images' and 'annotations' lists")
    captions: dict[Any, list[str]] = {}
    known = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for n, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or ann.get("image_id") not in known:
            yield f"{name}:annotation {n}", BadRecord(f"{path}: annotation {n}", "no image with its image_id")
            continue
        captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "file_name" not in img:
            yield f"{name}:image {n}", BadRecord(f"{path}: image {n}", "no file_name")
            continue
        record = {**img, "id": str(img.get("id")), "captions": captions.get(img.get("id"), [])}
        yield f"{name}:{img.get('id')}", record


# ---- tables ----------------------------------------------------------------------------------------


def table_files(path: str) -> list[str]:
    """The .parquet / .arrow files of a file or directory (a hub cache holds them in nested folders), sorted."""
    local = Path(path)
    if local.is_file():
        return [path]
    for suffix in TABLE_SUFFIXES:
        found = sorted(str(p) for p in local.rglob(f"*{suffix}") if not p.name.startswith("."))
        if found:
            return found
    return []


def _arrow_reader(path: str):
    """Record batches of an Arrow IPC file or stream (``datasets`` writes streams)."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.num_record_batches
    except pa.ArrowInvalid:
        source = pa.memory_map(path)
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader), None


def table_schema(path: str):
    """The Arrow schema of one table file (Parquet footer or Arrow header), without reading the rows."""
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        return pq.ParquetFile(path).schema_arrow
    return _arrow_reader(path)[0]


def table_rows_count(path: str) -> int | None:
    """Rows of a Parquet file from its footer (None for formats that do not record it up front)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.lower().endswith(".parquet") else None


def check_columns(path: str, schema, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r}; its columns are {schema.names}")


def read_table(
    path: str, columns: Sequence[str], name: str | None = None, start: int = 0, stop: int | None = None
) -> Iterator[Record]:
    """(``<name>:<row>``, {column: value}) for rows [start, stop) of a Parquet or Arrow file; only ``columns`` are
    read, and only the Parquet row groups holding those rows. ``name`` defaults to the file name (a directory
    input passes the path inside it)."""
    import pyarrow.parquet as pq

    name = name or Path(path).name
    first = 0  # the row the batches start at
    if path.lower().endswith(".parquet"):
        file = pq.ParquetFile(path)
        check_columns(path, file.schema_arrow, columns)
        bounds = [0]
        for g in range(file.metadata.num_row_groups):
            bounds.append(bounds[-1] + file.metadata.row_group(g).num_rows)
        groups = [g for g in range(len(bounds) - 1) if bounds[g + 1] > start and (stop is None or bounds[g] < stop)]
        first = bounds[groups[0]] if groups else 0
        batches = file.iter_batches(batch_size=BATCH_ROWS, columns=list(columns), row_groups=groups)
    else:
        schema, batches, _ = _arrow_reader(path)
        check_columns(path, schema, columns)
        batches = (b.select(list(columns)) for b in batches)
    row = first
    for batch in batches:
        if stop is not None and row >= stop:
            return
        skip = max(0, start - row)
        for offset, record in enumerate(batch.slice(skip).to_pylist(), row + skip):
            if stop is not None and offset >= stop:
                return
            yield f"{name}:{offset}", record
        row += batch.num_rows


def hf_dataset(path: str):
    """A ``datasets.save_to_disk`` directory as a Dataset (a DatasetDict must name its split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{path}: not a datasets.save_to_disk directory: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise InputError(f"{path}: holds splits {list(loaded)}; pass the split's directory ({path}/<split>)")
    return loaded


def read_hf(path: str, columns: Sequence[str]) -> Iterator[Record]:
    """Rows of a ``save_to_disk`` directory, undecoded (an ``Image`` column stays ``{"bytes", "path"}``)."""
    dataset = hf_dataset(path)
    check_columns(path, dataset.data.schema, columns)
    table = dataset.with_format("arrow").select_columns(list(columns))
    name = Path(path).name
    row = 0
    for batch in table.iter(batch_size=BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{name}:{row}", record
            row += 1


def class_label_names(path: str, column: str) -> list[str] | None:
    """The names of a ``datasets`` ``ClassLabel`` column (from a save_to_disk directory or the features a
    ``datasets``-written Parquet/Arrow file records), or None when the column is not a ClassLabel."""
    import datasets

    if Path(path).is_dir() and _format_of(path) == "hf":
        features = hf_dataset(path).features
    else:
        files = table_files(path)
        if not files:
            return None
        features = datasets.Features.from_arrow_schema(table_schema(files[0]))
    feature = features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ---- webdataset tars -------------------------------------------------------------------------------


def read_tar(url: str) -> Iterator[Record]:
    """The samples of one webdataset tar: ``(<tar name>/<key>, {extension: value, **json fields})``.

    A damaged tar yields its samples up to the damage and then one BadRecord naming the tar."""
    import webdataset as wds

    name = Path(url.split()[-1] if url.startswith("pipe:") else url).name
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    for sample in wds.tarfile_samples([{"url": url}], handler=stop):
        key = sample["__key__"]
        where = f"{name}/{Path(key).name}"
        yield where, _wds_record(sample, where)
    if errors:
        yield f"{name}/<end>", BadRecord(url, f"unreadable tar: {errors[0]}")


def _wds_record(sample: dict[str, Any], where: str) -> dict[str, Any] | BadRecord:
    record: dict[str, Any] = {}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        record[ext] = _decode(value) if ext == "txt" else value
    if "json" in record:
        try:
            meta = json.loads(_decode(record.pop("json")))
        except json.JSONDecodeError as e:
            return BadRecord(where, f".json member: invalid JSON: {e}")
        if isinstance(meta, dict):
            record.update({k: v for k, v in meta.items() if k not in record})
    return record


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
            blocks.append(Block(Path(path).name, lambda p=path: read_tar(p), _tar_rows(path)))
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


def _tar_rows(url: str) -> int | None:
    """Samples in a local tar from the ``<stem>_stats.json`` img2dataset writes beside it (None without one)."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    "BadRecord",
    "Block",
    "InputError",
    "check_columns",
    "class_label_names",
    "describe_formats",
    "detect_format",
    "expand_inputs",
    "first_records",
    "hf_dataset",
    "input_blocks",
    "is_valid_utf8",
    "open_input",
    "read_coco",
    "read_delimited",
    "read_jsonl",
    "read_table",
    "read_tar",
    "row_range_shards",
    "split_compression",
    "table_columns",
    "table_files",
    "table_rows_count",
    "table_schema",
]

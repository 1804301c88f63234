"""Text corpora -> Megatron indexed datasets (.bin/.idx) for FLAVA's MLM stream.

Inputs (``--input``: files, directories, globs, ``{a..b}`` brace ranges), the format chosen per input:

* JSON lines (``.jsonl``/``.json``/``.ndjson``): one document per record, its ``--text-field`` (alias
  ``--json-key``, default ``text``); ``where`` = ``file:line``.
* Tables with a ``--text-field`` column: ``.parquet``, ``.arrow``, a ``datasets.save_to_disk`` directory or a
  directory of Parquet/Arrow files (a Hugging Face hub cache); ``where`` = ``file:row``.
* Plain text (any other name): a document is a run of lines ended by a blank line, or with ``--doc-per-line``
  every non-blank line.

JSON lines and plain text may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``, read by suffix); other
archives and compressions (``.zip``, ``.tar.gz``, ``.lz4``, ...) are refused. Before the tokenizer loads, the
first input of each format is checked: a table without the text column, JSON lines whose first records lack the
field, or a line file whose first bytes are a compressed or binary format under the wrong name stop the run in
one line (exit 2) saying what was found.

Each kept document is stored as ONE sequence of raw token ids (no [CLS]/[SEP]; the loader adds them per window)
and its own document, written with megatron-core's ``IndexedDatasetBuilder`` so Megatron tools read the files
too.

Input records are cut into shards of ``--shard-size`` documents (``shard-NNNNNN.bin/.idx``, see
``preprocess/common.py`` for resume, multi-machine sharding and the manifest); ``--workers``
processes tokenize. When all of this machine's shards exist they are merged with the builder's
``add_index`` into ``<output>/<name>.bin/.idx`` (``<name>-nodeNNN-of-NNN`` with ``--num-shards``),
which is what ``flava_ds.data.text_dataset.TextDataset`` reads.

Skip reasons: ``bad_record`` (unparseable JSON line), ``missing_field``, ``not_a_string`` (also a null cell),
``not_utf8``, ``empty_text``, ``no_tokens``.

Usage::

    python -m preprocess.text --input 'ccnews/*.jsonl.zst' --output data/ccnews --tokenizer tokenizer.json \\
        --workers 8 [--num-shards 4 --shard-index $NODE]
    python -m preprocess.text --input ~/.cache/huggingface/hub/datasets--org--wiki --text-field text ...
    python -m preprocess.text --input 'books/part-{000..127}.txt.gz' --doc-per-line ...
"""

from __future__ import annotations

import argparse
import codecs
import gc
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flava_ds.data.tokenizer import Tokenizer
from preprocess.common import (
    TMP_PREFIX,
    ShardedRun,
    ShardResult,
    ShardTask,
    add_common_args,
    atomic_write_json,
    check_common_args,
    file_sha256,
    fixed_size_rows,
    fixed_size_shards,
    manifest_name,
    output_lock,
    shard_name,
    worker_pool,
)
from preprocess.readers import (
    COMPRESSIONS,
    TABLE_SUFFIXES,
    BadRecord,
    InputError,
    detect_format,
    expand_inputs,
    first_records,
    input_blocks,
    is_valid_utf8,
    open_input,
    split_compression,
    table_columns,
)

BAD_RECORD = "bad_record"
MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
NOT_UTF8 = "not_utf8"
EMPTY_TEXT = "empty_text"
NO_TOKENS = "no_tokens"
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
TOKENIZE_CHUNK = 64  # documents per task sent to a worker


@dataclass(frozen=True, slots=True)
class Document:
    """One input document: its text, or why it is skipped (``where`` = file:line or file:row for messages)."""

    where: str
    text: str | None = None
    skip: str | None = None


def _checked(where: str, text: str) -> Document:
    if not is_valid_utf8(text):
        return Document(where, skip=NOT_UTF8)
    if not text.strip():
        return Document(where, skip=EMPTY_TEXT)
    return Document(where, text)


def describe_text_formats() -> str:
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
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
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


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype holding every id (what Megatron's own preprocessing picks)."""
    return np.uint16 if vocab_size < 65500 else np.int32


_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer) -> None:
    _worker.update(tokenizer=tokenizer, dtype=token_dtype(tokenizer.vocab_size))


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=_worker["dtype"]) for ids in _worker["tokenizer"].encode_raw(texts)]


def _convert_shard(task: ShardTask, pool: Any, dtype: type[np.number]) -> ShardResult:
    """Tokenize a shard's documents in the pool; skips are counted with their place (``file:line``), so the
    manifest's ``skip_examples`` and the printed first few name them."""
    result = ShardResult(samples=0)
    docs = []
    for _, doc in task.records:
        if doc.skip:
            result.skip(doc.skip, doc.where)
        else:
            docs.append(doc)
    from flava_ds.data.text_dataset import IndexedDatasetBuilder  # megatron-core: imported once inputs are checked

    builder = IndexedDatasetBuilder(str(task.tmp_path(".bin")), dtype=dtype)
    chunks = [docs[i : i + TOKENIZE_CHUNK] for i in range(0, len(docs), TOKENIZE_CHUNK)]
    for chunk, token_ids in zip(chunks, pool.imap(_tokenize, [[d.text for d in c] for c in chunks])):
        before = result.samples
        for doc, ids in zip(chunk, token_ids):
            if ids.size == 0:
                result.skip(NO_TOKENS, doc.where)
                continue
            builder.add_document(ids, [ids.size])
            result.samples += 1
        task.progress(result.samples - before)  # the run adds the skipped records once the shard is done
    builder.finalize(str(task.tmp_path(".idx")))
    return result


def merged_name(name: str, num_shards: int, shard_index: int) -> str:
    return name if num_shards == 1 else f"{name}-node{shard_index:03d}-of-{num_shards:03d}"


def merge_shards(output: Path, manifest_file: str, prefix_name: str, dtype: type[np.number]) -> dict:
    """Concatenate the manifest's shards into one indexed dataset (atomic per file); returns its record."""
    manifest_path = output / manifest_file
    manifest = json.loads(manifest_path.read_text())
    tmp_prefix = output / f"{TMP_PREFIX}{prefix_name}"
    from flava_ds.data.text_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    # add_index runs gc.collect() per shard, which costs ~0.3 s with torch loaded; frozen objects are skipped.
    gc.freeze()
    try:
        for shard in manifest["shards"]:
            builder.add_index(str(output / shard_name(shard["index"])))
    finally:
        gc.unfreeze()
    builder.finalize(f"{tmp_prefix}.idx")
    files = []
    for suffix in (".bin", ".idx"):
        final = output / f"{prefix_name}{suffix}"
        os.replace(f"{tmp_prefix}{suffix}", final)
        files.append({"name": final.name, "size": final.stat().st_size, "sha256": file_sha256(final)})
    manifest["merged"] = {
        "prefix": prefix_name,
        "documents": len(builder.document_indices) - 1,
        "tokens": int(sum(builder.sequence_lengths)),
        "dtype": np.dtype(dtype).name,
        "files": files,
    }
    atomic_write_json(manifest_path, manifest)
    return manifest["merged"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.text", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or directories (globs, {a..b} ranges); see the formats above"
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, BERT vocab.txt or sentencepiece .model")
    parser.add_argument(
        "--text-field",
        "--json-key",
        dest="text_field",
        default="text",
        help="JSON lines field or table column holding the document text",
    )
    parser.add_argument(
        "--doc-per-line", action="store_true", help="plain text: every non-blank line is a document (not paragraphs)"
    )
    parser.add_argument("--name", default="text", help="file name of the merged dataset inside --output")
    add_common_args(parser, default_shard_size=50_000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_common_args(args)
        inputs = expand_inputs(args.input)
    except ValueError as e:
        parser.error(str(e))
    with output_lock(args):  # before the inputs are read and the tokenizer loads; held through the merge
        try:
            check_inputs(inputs, args.text_field)
            total = count_documents(inputs, args.text_field)
        except InputError as e:
            parser.error(str(e))
        try:
            tokenizer = Tokenizer.from_file(args.tokenizer)
        except ValueError as e:
            parser.error(str(e))
        dtype = token_dtype(tokenizer.vocab_size)
        run = ShardedRun(
            args,
            kind="text",
            fingerprints={"tokenizer": tokenizer.fingerprint},
            file_suffixes=(".bin", ".idx"),
        )
        with worker_pool(args.workers, _init_worker, (tokenizer,)) as pool:
            code = run.run(
                fixed_size_shards(read_documents(inputs, args.text_field, args.doc_per_line), args.shard_size),
                lambda task: _convert_shard(task, pool, dtype),
                shard_rows=fixed_size_rows(total, args.shard_size),
            )
        if code:
            return code
        name = merged_name(args.name, args.num_shards, args.shard_index)
        merged = merge_shards(Path(args.output), manifest_name(args.num_shards, args.shard_index), name, dtype)
    print(f"[text] merged {merged['documents']} documents into {Path(args.output) / name}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

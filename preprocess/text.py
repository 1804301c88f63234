"""Text corpora (JSONL or plain text) -> Megatron indexed datasets (.bin/.idx) for FLAVA's MLM stream.

A document is one JSONL record (its ``--json-key`` field, default ``text``) or, in a plain text file,
a run of lines ended by a blank line. Each kept document is stored as ONE sequence of raw token ids
(no [CLS]/[SEP]; the loader adds them per window) and its own document, written with megatron-core's
``IndexedDatasetBuilder`` so Megatron tools read the files too.

Input records are cut into shards of ``--shard-size`` documents (``shard-NNNNNN.bin/.idx``, see
``preprocess/common.py`` for resume, multi-machine sharding and the manifest); ``--workers``
processes tokenize. When all of this machine's shards exist they are merged with the builder's
``add_index`` into ``<output>/<name>.bin/.idx`` (``<name>-nodeNNN-of-NNN`` with ``--num-shards``),
which is what ``flava_ds.data.text_dataset.TextDataset`` reads.

Skip reasons: ``bad_record`` (unparseable JSON line), ``missing_field``, ``not_a_string``,
``not_utf8``, ``empty_text``, ``no_tokens``.

Usage::

    python -m preprocess.text --input 'ccnews/*.jsonl' --output data/ccnews --tokenizer tokenizer.json \\
        --workers 8 [--num-shards 4 --shard-index $NODE]
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flava_ds.data.text_dataset import IndexedDatasetBuilder
from flava_ds.data.tokenizer import Tokenizer
from preprocess.common import (
    TMP_PREFIX,
    BadRecord,
    ShardedRun,
    ShardResult,
    ShardTask,
    add_common_args,
    atomic_write_json,
    check_common_args,
    file_sha256,
    is_valid_utf8,
    manifest_name,
    output_lock,
    read_jsonl,
    shard_name,
    worker_pool,
)

BAD_RECORD = "bad_record"
MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
NOT_UTF8 = "not_utf8"
EMPTY_TEXT = "empty_text"
NO_TOKENS = "no_tokens"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TOKENIZE_CHUNK = 64  # documents per task sent to a worker


@dataclass(frozen=True, slots=True)
class Document:
    """One input document: its text, or why it is skipped (``where`` = file:line for messages)."""

    where: str
    text: str | None = None
    skip: str | None = None


def _checked(where: str, text: str) -> Document:
    if not is_valid_utf8(text):
        return Document(where, skip=NOT_UTF8)
    if not text.strip():
        return Document(where, skip=EMPTY_TEXT)
    return Document(where, text)


def read_plain_text(path: Path) -> Iterator[Document]:
    """Documents of a plain text file: runs of non-blank lines (invalid UTF-8 kept as surrogates)."""
    lines: list[str] = []
    start = 1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if line.strip():
                if not lines:
                    start = lineno
                lines.append(line)
            elif lines:
                yield _checked(f"{path.name}:{start}", "\n".join(lines))
                lines = []
    if lines:
        yield _checked(f"{path.name}:{start}", "\n".join(lines))


def read_json_documents(path: Path, json_key: str) -> Iterator[Document]:
    for where, record in read_jsonl(path):
        if isinstance(record, BadRecord):
            yield Document(where, skip=BAD_RECORD)
        elif json_key not in record:
            yield Document(where, skip=MISSING_FIELD)
        elif not isinstance(record[json_key], str):
            yield Document(where, skip=NOT_A_STRING)
        else:
            yield _checked(where, record[json_key])


def read_documents(paths: Sequence[Path], json_key: str = "text") -> Iterator[Document]:
    """All documents of the inputs in order; .jsonl/.json/.ndjson are JSON lines, anything else plain text."""
    for path in paths:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from read_json_documents(path, json_key)
        else:
            yield from read_plain_text(path)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by the patterns (globs sorted), in the order given; a pattern matching nothing is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            raise ValueError(f"--input {pattern!r}: no such file")
        paths.extend(found)
    return paths


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype holding every id (what Megatron's own preprocessing picks)."""
    return np.uint16 if vocab_size < 65500 else np.int32


_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer) -> None:
    _worker.update(tokenizer=tokenizer, dtype=token_dtype(tokenizer.vocab_size))


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=_worker["dtype"]) for ids in _worker["tokenizer"].encode_raw(texts)]


class SkipLog:
    """Counts skipped documents per reason and names the first few of each, so bad inputs can be found."""

    def __init__(self, examples_per_reason: int = 3):
        self.examples_per_reason = examples_per_reason
        self.seen: Counter = Counter()

    def skip(self, doc: Document, reason: str, counts: Counter) -> None:
        counts[reason] += 1
        self.seen[reason] += 1
        if self.seen[reason] <= self.examples_per_reason:
            tqdm.write(f"[text] skipped {doc.where}: {reason}", file=sys.stderr)


def _convert_shard(task: ShardTask, pool: Any, dtype: type[np.number], log: SkipLog) -> ShardResult:
    skipped: Counter = Counter()
    docs = []
    for _, doc in task.records:
        if doc.skip:
            log.skip(doc, doc.skip, skipped)
        else:
            docs.append(doc)
    builder = IndexedDatasetBuilder(str(task.tmp_path(".bin")), dtype=dtype)
    written = 0
    chunks = [docs[i : i + TOKENIZE_CHUNK] for i in range(0, len(docs), TOKENIZE_CHUNK)]
    for chunk, token_ids in zip(chunks, pool.imap(_tokenize, [[d.text for d in c] for c in chunks])):
        for doc, ids in zip(chunk, token_ids):
            if ids.size == 0:
                log.skip(doc, NO_TOKENS, skipped)
                continue
            builder.add_document(ids, [ids.size])
            written += 1
        task.progress(len(chunk))
    builder.finalize(str(task.tmp_path(".idx")))
    return ShardResult(samples=written, skipped=skipped)


def merged_name(name: str, num_shards: int, shard_index: int) -> str:
    return name if num_shards == 1 else f"{name}-node{shard_index:03d}-of-{num_shards:03d}"


def merge_shards(output: Path, manifest_file: str, prefix_name: str, dtype: type[np.number]) -> dict:
    """Concatenate the manifest's shards into one indexed dataset (atomic per file); returns its record."""
    manifest_path = output / manifest_file
    manifest = json.loads(manifest_path.read_text())
    tmp_prefix = output / f"{TMP_PREFIX}{prefix_name}"
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
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or plain text files (globs allowed)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, BERT vocab.txt or sentencepiece .model")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the document text")
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
    with output_lock(args):  # before the tokenizer loads; held through the merge, which writes the output too
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
        log = SkipLog()
        with worker_pool(args.workers, _init_worker, (tokenizer,)) as pool:
            code = run.run(read_documents(inputs, args.json_key), lambda task: _convert_shard(task, pool, dtype, log))
        if code:
            return code
        name = merged_name(args.name, args.num_shards, args.shard_index)
        merged = merge_shards(Path(args.output), manifest_name(args.num_shards, args.shard_index), name, dtype)
    print(f"[text] merged {merged['documents']} documents into {Path(args.output) / name}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

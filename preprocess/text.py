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
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flava_ds.data.tokenizer import Tokenizer
from flava_ds.shard_format import TMP_PREFIX, atomic_write_json, file_entry, manifest_name, publish
from preprocess.common import add_common_args, check_common_args, output_lock, worker_pool
from preprocess.input_records import InputError
from preprocess.readers import expand_inputs
from preprocess.sharded_run import ShardedRun
from preprocess.shards import ShardResult, ShardTask, fixed_size_rows, fixed_size_shards, shard_name
from preprocess.text_inputs import check_inputs, count_documents, read_documents

NO_TOKENS = "no_tokens"
TOKENIZE_CHUNK = 64  # documents per task sent to a worker


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype holding every id (what Megatron's own preprocessing picks)."""
    return np.uint16 if vocab_size < 65500 else np.int32


_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer) -> None:
    """Per worker process: what ``_tokenize`` reads."""
    _worker.update(tokenizer=tokenizer, dtype=token_dtype(tokenizer.vocab_size))


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    """Raw token ids (no [CLS]/[SEP]) of a chunk of documents, in the shard's dtype."""
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
    """The merged dataset's prefix: ``--name``, per machine in a multi-machine run."""
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
        publish(f"{tmp_prefix}{suffix}", final)
        files.append(file_entry(final))
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

"""Image-text pairs (JSONL, TSV with a header row, or Parquet) -> Arrow IPC shards for FLAVA pretraining.

Columns: ``id`` (the ``--id-field`` value, else ``<input file name>:<line>``; ``:<row>`` for Parquet),
``image`` (JPEG of the S x S image), ``codebook_tokens`` / ``codebook_tokens_flipped`` ((S/16)^2
uint16, see ``preprocess/images.py``), ``input_ids`` (int32, ``[CLS] ... [SEP]``, at most
``--max-length``) and ``caption`` (the raw caption, stripped of surrounding whitespace).

Captions are kept when they are non-empty, at most ``--max-caption-bytes`` in UTF-8 (default 16 KiB),
valid UTF-8, have MORE than ``--min-words`` words (whitespace-separated; the PMD filter, default 3, so
"a red car" is dropped) and, with ``--english-only``, are classified English by the ``langid`` package
(``pip install langid``). Image paths are read only inside ``--image-root`` (see ``path_under_root``).

Usage::

    python -m preprocess.pairs --input cc3m.jsonl --image-root /data/cc3m --output shards/cc3m \\
        --tokenizer tokenizer.json --codebook /ckpt/flava-codebook --workers 15 --device cuda \\
        [--num-shards 8 --shard-index $NODE]

Skipped samples are counted per reason in ``manifest.json`` (see ``preprocess/common.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from flava_ds.data.tokenizer import Tokenizer
from preprocess.common import BadRecord, add_common_args, is_valid_utf8, output_lock, read_records
from preprocess.images import (
    BAD_RECORD,
    SkipSample,
    add_image_args,
    check_image_args,
    image_settings,
    load_square_image,
    path_under_root,
    run_image_conversion,
)

EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
TOO_FEW_WORDS = "too_few_words"
NOT_ENGLISH = "not_english"
CAPTION_TOO_LONG = "caption_too_long"

_worker: dict[str, Any] = {}


def _language_classifier():
    """langid ships its model inside the package and is deterministic; imported only when asked for."""
    try:
        import langid
    except ImportError:
        raise SystemExit("--english-only needs the 'langid' package: pip install langid") from None
    return langid.classify


def _init_pair_worker(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    _worker.update(
        args=args,
        settings=image_settings(args),
        root=Path(args.image_root) if args.image_root else Path("."),
        tokenizer=tokenizer,
        classify=_language_classifier() if args.english_only else None,
    )


def check_caption(caption: Any, min_words: int, max_bytes: int, classify: Callable[[str], tuple] | None) -> str:
    """The caption without surrounding whitespace, or SkipSample with the reason it is unusable.

    The size is checked before the text is split, classified or tokenised, so a huge caption costs
    one pass over its bytes and is never stored."""
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        raise SkipSample(EMPTY_CAPTION, "caption is empty")
    if not isinstance(caption, str):
        raise SkipSample(BAD_RECORD, f"caption is a {type(caption).__name__}, not a string")
    size = len(caption.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise SkipSample(CAPTION_TOO_LONG, f"{size} bytes > --max-caption-bytes {max_bytes}")
    if not is_valid_utf8(caption):
        raise SkipSample(CAPTION_NOT_UTF8, repr(caption[:80]))
    words = caption.split()
    if len(words) <= min_words:
        raise SkipSample(TOO_FEW_WORDS, f"{len(words)} words <= --min-words {min_words}")
    if classify is not None and classify(caption)[0] != "en":
        raise SkipSample(NOT_ENGLISH, caption[:80])
    return caption.strip()


def prepare_pair_record(record: tuple[int, tuple[str, Any]]) -> dict | SkipSample:
    """(record index, (source id, parsed record)) -> prepared row, or the reason to skip it and where."""
    _, (source_id, payload) = record
    args = _worker["args"]
    try:
        if isinstance(payload, BadRecord):
            raise SkipSample(BAD_RECORD, payload.error)
        sample_id = source_id
        if args.id_field:
            sample_id = payload.get(args.id_field)
            if sample_id in (None, "") or not is_valid_utf8(str(sample_id)):
                raise SkipSample(BAD_RECORD, f"no usable {args.id_field!r} field")
        caption = check_caption(
            payload.get(args.caption_field), args.min_words, args.max_caption_bytes, _worker["classify"]
        )
        image_path = payload.get(args.image_field)
        if not isinstance(image_path, str) or not image_path:
            raise SkipSample(BAD_RECORD, f"no {args.image_field!r} field")
        jpeg, view = load_square_image(path_under_root(_worker["root"], image_path), _worker["settings"])
    except SkipSample as skip:
        return SkipSample(skip.reason, f"{source_id}: {skip.detail}")
    input_ids = _worker["tokenizer"].encode(caption, args.max_length)
    return {"id": str(sample_id), "image": jpeg, "view": view, "input_ids": input_ids, "caption": caption}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m preprocess.pairs")
    g = parser.add_argument_group("input and text")
    g.add_argument("--input", required=True, nargs="+", help=".jsonl, .tsv (header row) or .parquet files")
    g.add_argument(
        "--image-root",
        help="image paths are relative to this directory (default: the current one); absolute paths and "
        "paths escaping it with '..' are skipped (outside_image_root)",
    )
    g.add_argument("--image-field", default="image")
    g.add_argument("--caption-field", default="caption")
    g.add_argument("--id-field", help="field holding a stable sample id (default: <file name>:<line>)")
    g.add_argument("--tokenizer", required=True, help="tokenizer.json, BERT vocab.txt or sentencepiece .model")
    g.add_argument("--max-length", type=int, default=77, help="max caption tokens including [CLS]/[SEP]")
    g.add_argument("--min-words", type=int, default=3, help="keep captions of MORE than this many words")
    g.add_argument(
        "--max-caption-bytes",
        type=int,
        default=16384,
        help="skip captions longer than this in UTF-8 (caption_too_long), before tokenising",
    )
    g.add_argument("--english-only", action="store_true", help="keep English captions only (needs langid)")
    add_image_args(parser)
    add_common_args(parser, default_shard_size=5000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_image_args(parser, args)
    if args.max_length < 2:
        parser.error(f"--max-length must be >= 2 to hold [CLS] and [SEP], got {args.max_length}")
    if args.max_caption_bytes < 1:
        parser.error(f"--max-caption-bytes must be >= 1, got {args.max_caption_bytes}")
    for path in args.input:
        if not Path(path).is_file():
            parser.error(f"--input {path}: no such file")
    if args.english_only:
        _language_classifier()
    with output_lock(args):  # before the tokenizer and the codebook: a second converter exits at once
        tokenizer = Tokenizer.from_file(args.tokenizer)
        columns = [args.image_field, args.caption_field] + ([args.id_field] if args.id_field else [])
        return run_image_conversion(
            args,
            "pairs",
            read_records(args.input, columns),
            prepare_pair_record,
            _init_pair_worker,
            (args, tokenizer),
            [("input_ids", pa.list_(pa.int32())), ("caption", pa.string())],
            {"tokenizer": tokenizer.fingerprint},
        )


if __name__ == "__main__":
    sys.exit(main())

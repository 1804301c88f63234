"""Image-text pairs in the forms PMD subsets come in -> Arrow IPC shards for FLAVA pretraining.

Inputs (``preprocess/readers.py``; the format is picked from the paths, ``--format`` overrides):
webdataset tars as img2dataset writes them (globs, ``{00000..00999}`` ranges, ``pipe:`` URLs), Parquet /
Arrow files or directories (a Hugging Face hub cache), a ``datasets.save_to_disk`` directory, COCO caption
annotations, JSONL / CSV / TSV (optionally compressed; ``--columns caption,image`` for files without a header).

Fields: the image is ``--image-field`` (default: the first of ``jpg,jpeg,png,webp`` in a tar, ``file_name`` in
COCO, else ``image``): a path (read inside ``--image-root``), encoded bytes, or the HF ``Image`` struct. The
caption is ``--caption-field`` (default ``txt`` in a tar, i.e. the ``.txt`` member; ``caption`` elsewhere; COCO
gives every caption of an image): a string, or a list of captions of the same image. An image is stored ONCE
with all its usable captions; training draws one per (sample, epoch).

Columns: ``id`` (the ``--id-field`` value, else ``<input name>:<line or row>``, ``<tar name>/<key>`` for tars,
``<file>:<image id>`` for COCO), ``image`` (JPEG of the S x S image), ``codebook_tokens`` /
``codebook_tokens_flipped`` ((S/16)^2 uint16, see ``preprocess/image_shards.py``), ``captions`` (list of strings,
stripped) and ``input_ids`` (one int32 list per caption, ``[CLS] ... [SEP]``, at most ``--max-length``).

Captions are kept when they are non-empty, at most ``--max-caption-bytes`` in UTF-8 (default 16 KiB), valid
UTF-8, have MORE than ``--min-words`` words (the PMD filter, default 3, so "a red car" is dropped) and, with
``--english-only``, are classified English by the ``langid`` package (``pip install langid``). A sample is
skipped (counted by the reason of its first caption) when none of its captions is kept; captions dropped from
kept samples are counted under ``dropped`` in the manifest.

Wrong inputs are refused in seconds, before the tokenizer and the codebook load: the first records are read and
checked (a missing field names the fields present; an image root holding none of the first images says so).

Usage::

    python -m preprocess.pairs --input 'cc3m/{00000..00331}.tar' --output shards/cc3m \\
        --tokenizer tokenizer.json --codebook /ckpt/flava-codebook --workers 15 --device cuda \\
        [--num-shards 8 --shard-index $NODE]
    python -m preprocess.pairs --input annotations/captions_train2017.json --image-root coco/train2017 ...

Tars become one output shard each (a machine skips the others' tars unopened); other inputs are cut into
``--shard-size`` records (of Parquet, a machine reads only the row groups of its own shards). Skipped samples
are counted per reason in ``manifest.json`` (``preprocess/common.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from flava_ds.data.tokenizer import Tokenizer
from flava_ds.shard_format import CAPTIONS, ID, IMAGE, INPUT_IDS
from preprocess.common import add_common_args, add_settings_flags, converter_parser, output_lock, settings_from_args
from preprocess.image_decoding import ImageSettings, SkipSample, image_source, load_square_image
from preprocess.image_shards import add_image_args, check_image_args, run_image_conversion
from preprocess.input_records import BAD_RECORD, BadRecord, InputError, decode_text, is_valid_utf8
from preprocess.readers import (
    FORMATS,
    Block,
    detect_format,
    expand_inputs,
    first_records,
    input_blocks,
    row_range_shards,
    table_columns,
)
from preprocess.shards import ShardInput, fixed_size_rows, fixed_size_shards
from preprocess.table_readers import TABLE_FORMATS
from preprocess.tar_reader import WDS_IMAGE_EXTENSIONS

EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
TOO_FEW_WORDS = "too_few_words"
NOT_ENGLISH = "not_english"
CAPTION_TOO_LONG = "caption_too_long"
PROBE_RECORDS = 50  # records read at start-up to check the fields and the image root
DEFAULT_FIELDS = {  # format -> (image field alternatives, caption field)
    "webdataset": (",".join(WDS_IMAGE_EXTENSIONS), "txt"),
    "coco": ("file_name", "captions"),
}


@dataclass(frozen=True)
class CaptionRules:
    """Which captions are kept (``check_caption``); each field is also the flag of its name (``add_settings_flags``)."""

    min_words: int = field(default=3, metadata={"help": "keep captions of MORE than this many words"})
    max_caption_bytes: int = field(
        default=16384,
        metadata={"help": f"skip captions longer than this in UTF-8 ({CAPTION_TOO_LONG}), before tokenising"},
    )
    english_only: bool = field(default=False, metadata={"help": "keep English captions only (needs langid)"})


_worker: dict[str, Any] = {}


def _language_classifier():
    """langid ships its model inside the package and is deterministic; imported only when asked for."""
    try:
        import langid
    except ImportError:
        raise SystemExit("--english-only needs the 'langid' package: pip install langid") from None
    return langid.classify


def _init_pair_worker(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    """Per worker process: what ``prepare_pair_record`` reads."""
    _worker.update(
        args=args,
        settings=settings_from_args(ImageSettings, args),
        rules=settings_from_args(CaptionRules, args),
        root=Path(args.image_root) if args.image_root else Path("."),
        tokenizer=tokenizer,
        classify=_language_classifier() if args.english_only else None,
    )


def check_caption(caption: Any, min_words: int, max_bytes: int, classify: Callable[[str], tuple] | None) -> str:
    """The caption without surrounding whitespace, or SkipSample with the reason it is unusable.

    The size is checked before the text is split, classified or tokenised, so a huge caption costs
    one pass over its bytes and is never stored."""
    if isinstance(caption, bytes):
        caption = decode_text(caption)
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


def usable_captions(value: Any, rules: CaptionRules, classify) -> tuple[list[str], list[str]]:
    """(kept captions, reasons of the dropped ones) of a caption field holding one caption or a list;
    SkipSample (the first caption's reason) when none is usable."""
    candidates = value if isinstance(value, list) else [value]
    if not candidates:
        raise SkipSample(EMPTY_CAPTION, "no captions")
    kept, dropped, first = [], [], None
    for caption in candidates:
        try:
            kept.append(check_caption(caption, rules.min_words, rules.max_caption_bytes, classify))
        except SkipSample as skip:
            first = first or skip
            dropped.append(skip.reason)
    if not kept:
        raise first
    return kept, dropped


def pick_field(payload: dict, alternatives: str) -> tuple[str, Any]:
    """(name, value) of the first of the comma-separated field names the record has (value None if none)."""
    names = alternatives.split(",")
    for name in names:
        if payload.get(name) is not None:
            return name, payload[name]
    return names[0], None


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
        captions, dropped = usable_captions(payload.get(args.caption_field), _worker["rules"], _worker["classify"])
        field, value = pick_field(payload, args.image_field)
        source = image_source(value, _worker["root"], field)
        where = None if isinstance(source, Path) else f"{field} ({len(source)} bytes)"
        jpeg, view = load_square_image(source, _worker["settings"], where)
    except SkipSample as skip:
        return SkipSample(skip.reason, f"{source_id}: {skip.detail}")
    input_ids = [_worker["tokenizer"].encode(c, args.max_length) for c in captions]
    return {
        ID: str(sample_id),
        IMAGE: jpeg,
        "view": view,
        CAPTIONS: captions,
        INPUT_IDS: input_ids,
        "dropped": dropped,
    }


def probe_inputs(blocks: Sequence[Block], args: argparse.Namespace, fmt: str) -> None:
    """Read the first records and refuse, with one line, inputs that cannot be what the flags say: every
    record unreadable, a field none of them has (naming the fields they have), or an image root holding none
    of their image paths. Runs before the tokenizer and the codebook load."""
    head = first_records(blocks, PROBE_RECORDS)
    first = blocks[0].name
    if not head:
        raise InputError(f"{first}: no records in the input")
    parsed = [payload for _, payload in head if not isinstance(payload, BadRecord)]
    if not parsed:
        raise InputError(f"{first}: the first {len(head)} records are unreadable, e.g. {head[0][1].error}")
    present = sorted({key for payload in parsed for key in payload})
    hint = " (a file without a header row? name its columns with --columns)" if fmt in ("csv", "tsv") else ""
    flags = [("--image-field", args.image_field), ("--caption-field", args.caption_field)]
    if args.id_field:
        flags.append(("--id-field", args.id_field))
    for flag, alternatives in flags:
        if not any(pick_field(p, alternatives)[1] is not None for p in parsed):
            raise InputError(
                f"{first}: no field {alternatives!r} ({flag}) in the first {len(parsed)} records; "
                f"fields present: {present}{hint}"
            )
    root = Path(args.image_root) if args.image_root else Path(".")
    paths = [v for p in parsed if isinstance(v := pick_field(p, args.image_field)[1], str)]
    if paths and not any(_exists_under(root, path) for path in paths):
        raise InputError(
            f"{first}: none of the first {len(paths)} images exists under --image-root {root.absolute()} "
            f"(e.g. {paths[0]!r}); point --image-root at the directory the paths are relative to"
        )


def _exists_under(root: Path, relative: str) -> bool:
    try:
        return image_source(relative, root, "image").is_file()
    except SkipSample:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser, g = converter_parser(
        __doc__,
        "pairs",
        "input and text",
        "tars, .parquet/.arrow files or directories, a save_to_disk directory, COCO .json, .jsonl/.csv/.tsv "
        "(optionally .gz/.bz2/.xz/.zst); globs and {a..b} ranges are expanded",
    )
    g.add_argument("--format", choices=FORMATS, help="the input format (default: from the paths)")
    g.add_argument(
        "--columns",
        help="comma-separated field names of CSV/TSV files that have no header row, e.g. caption,image",
    )
    g.add_argument(
        "--image-root",
        help="image paths are relative to this directory (default: the current one); absolute paths and "
        "paths escaping it with '..' are skipped (outside_image_root)",
    )
    g.add_argument("--image-field", help="field holding the image (comma-separated alternatives: the first present)")
    g.add_argument("--caption-field", help="field holding the caption or a list of captions")
    g.add_argument("--id-field", help="field holding a stable sample id (default: <input name>:<line>)")
    g.add_argument("--tokenizer", required=True, help="tokenizer.json, BERT vocab.txt or sentencepiece .model")
    g.add_argument("--max-length", type=int, default=77, help="max caption tokens including [CLS]/[SEP]")
    add_settings_flags(g, CaptionRules)
    add_image_args(parser)
    add_common_args(parser, default_shard_size=5000)
    return parser


def plan_inputs(args: argparse.Namespace) -> tuple[list[Block], Iterable[ShardInput], list[int] | None]:
    """The input blocks, this run's shards over them and their record counts where known (InputError if the
    input cannot be read as asked). Fills in the per-format default fields."""
    paths = expand_inputs(args.input)
    fmt = detect_format(paths, args.format)
    image_default, caption_default = DEFAULT_FIELDS.get(fmt, ("image", "caption"))
    args.format = fmt
    args.image_field = args.image_field or image_default
    args.caption_field = args.caption_field or caption_default
    header = args.columns.split(",") if args.columns else None
    wanted = None
    if fmt in TABLE_FORMATS:
        present = table_columns(paths, fmt) or []
        image = next((name for name in args.image_field.split(",") if name in present), args.image_field)
        wanted = [image, args.caption_field] + ([args.id_field] if args.id_field else [])
        missing = [name for name in wanted if name not in present]
        if missing:
            raise InputError(f"{paths[0]}: no column {missing[0]!r}; its columns are {present}")
    blocks = input_blocks(paths, fmt, wanted, header)
    rows = [b.rows for b in blocks]
    known = None if None in rows else rows
    if fmt == "webdataset":  # one shard per tar
        return blocks, [ShardInput(None, lambda b=b: list(b.read())) for b in blocks], known
    total = None if known is None else sum(known)
    shards = row_range_shards(blocks, args.shard_size)  # Parquet: each machine reads only its own rows
    if shards is None:
        shards = fixed_size_shards((record for block in blocks for record in block.read()), args.shard_size)
    return blocks, shards, fixed_size_rows(total, args.shard_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_image_args(parser, args)
    if args.max_length < 2:
        parser.error(f"--max-length must be >= 2 to hold [CLS] and [SEP], got {args.max_length}")
    if args.max_caption_bytes < 1:
        parser.error(f"--max-caption-bytes must be >= 1, got {args.max_caption_bytes}")
    if args.english_only:
        _language_classifier()
    try:
        blocks, shards, shard_rows = plan_inputs(args)
        if args.format == "webdataset":  # a machine reads only its own tars, the probe included
            blocks = blocks[args.shard_index :: args.num_shards] or blocks
        probe_inputs(blocks, args, args.format)
    except InputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    with output_lock(args):  # before the tokenizer and the codebook: a second converter exits at once
        tokenizer = Tokenizer.from_file(args.tokenizer)
        return run_image_conversion(
            args,
            "pairs",
            shards,
            shard_rows,
            prepare_pair_record,
            _init_pair_worker,
            (args, tokenizer),
            [(CAPTIONS, pa.list_(pa.string())), (INPUT_IDS, pa.list_(pa.list_(pa.int32())))],
            {"tokenizer": tokenizer.fingerprint},
        )


if __name__ == "__main__":
    sys.exit(main())

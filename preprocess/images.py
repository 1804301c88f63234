"""Image-classification data (class folders, list files, Parquet / Arrow / datasets tables) -> Arrow image shards.

This module also defines the image half of the shard format that ``preprocess/pairs.py`` extends with
text. Every row stores the image once at S x S (short side resized to S, centre crop, JPEG bytes) and
the dVAE token grid of its *codebook view* (the decoded S x S JPEG reduced 2x, pixels in [0, 1]) for
the image and for its horizontal flip, each (S/16)^2 uint16 tokens, row-major. Training crops at
offsets that are multiples of 16 px, so slices of these grids are the MIM targets and the dVAE never
runs during training. Tokens come from the decoded JPEG, i.e. exactly the pixels training sees.

Usage::

    python -m preprocess.images --input /data/imagenet/train --output shards/in1k \\
        --codebook /ckpt/flava-codebook --image-size 256 --workers 15 --device cuda \\
        --class-names LOC_synset_mapping.txt
    python -m preprocess.images --input val_list.txt --image-root /data/imagenet/val --output shards/val ...
    python -m preprocess.images --input 'imagenet-1k/data/train-*.parquet' --output shards/in1k ...
    python -m preprocess.images --input cifar10_saved/train --image-field img --output shards/cifar10 ...

Inputs (``--input``; several list files or tables, globs expanded):

* class folders: ``root/<class>/<image>``; labels index the sorted class folder names; ids are the paths.
* list files (any file that is not a table, optionally ``.gz``/``.bz2``/``.xz``/``.zst``): one
  ``relative/path label`` per line, the label an integer (used as given) or a class name (the names are
  indexed in sorted order); ids are the paths.
* tables: ``.parquet`` / ``.arrow`` files, directories of them (a hub cache), a ``datasets.save_to_disk``
  directory. ``--image-field`` (default ``image``) holds a Hugging Face ``Image`` struct ``{bytes, path}``,
  encoded image bytes or a path; ``--label-field`` (default ``label``) a ``ClassLabel`` (its names are the
  classes; an out-of-range label such as the -1 of unlabelled splits is a bad record), other integers (used
  as given) or class names (indexed in sorted order). Ids are ``<file>:<row>``.

Image paths (of list files and tables) are relative to ``--image-root`` (default: the folder of the first
input) and are read only inside it (see ``path_under_root``).

``classes.json`` (``{name: label}``, the names zero-shot evaluation prompts with) holds the class folder
names, label names or ClassLabel names, or their readable names from ``--class-names``: a JSON object
``{id: name}`` (``{"n01440764": "tench", ...}``), a JSON list of the names by label, or ``id<TAB>name`` lines
(ImageNet's space-separated ``LOC_synset_mapping.txt`` reads too). Integer labels used as given get a
``classes.json`` only from ``--class-names`` (a list by label, or ids ``0``, ``1``, ...). classes.json keys
are unique, so a readable name shared by several classes (ImageNet has two ``crane``s and two ``maillot``s)
is written ``name (id)`` for each of them, e.g. ``crane (n02012849)`` and ``crane (n03126707)``.

Mistakes in the input stop the run before the codebook loads or a worker starts: a table without the
fields (naming its columns), a class the ``--class-names`` file does not name, an image root under which
none of the first 50 image paths exists. No shard or manifest is written then: the corrected rerun starts afresh.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from preprocess.common import (
    ShardedRun,
    ShardInput,
    ShardResult,
    ShardTask,
    add_common_args,
    atomic_write_json,
    check_common_args,
    fixed_size_rows,
    fixed_size_shards,
    output_lock,
    worker_pool,
)
from preprocess.readers import (
    BadRecord,
    Block,
    InputError,
    check_columns,
    class_label_names,
    detect_format,
    expand_inputs,
    hf_dataset,
    input_blocks,
    open_input,
    table_files,
    table_schema,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
ROWS_PER_RECORD_BATCH = 256  # fixed, so output bytes do not depend on the dVAE batch size

# skip reasons (manifest keys)
BAD_RECORD = "bad_record"
MISSING_FILE = "missing_file"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
OUTSIDE_IMAGE_ROOT = "outside_image_root"


class SkipSample(Exception):
    """Raised by per-sample preparation; the reason becomes a manifest skip count."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSettings:
    image_size: int = 256
    min_side: int = 16
    max_pixels: int = 8192 * 8192
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"--image-size must be a positive multiple of 16, got {self.image_size}")

    @property
    def grid(self) -> int:
        """Token grid side: the dVAE maps the S/2 codebook view to an S/16 grid."""
        return self.image_size // 16


# ---- per-sample image work (runs in the worker processes) ------------------------------------------


def path_under_root(root: Path, relative: str) -> Path:
    """The input's image path inside `root`, or SkipSample(outside_image_root) when it names a file elsewhere.

    Input files are untrusted, so a path that resolves outside the root (judged lexically, after
    normalisation: `..` escapes, absolute paths elsewhere) is never read; an absolute path inside the root is
    fine (`--image-root /` admits every absolute path). Symlinks inside the root are followed, wherever they
    point: whoever can create them already controls what the root holds."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, target]) != base:
        raise SkipSample(OUTSIDE_IMAGE_ROOT, f"{relative!r} is not inside the image root {root}")
    return Path(target)


ImageInput = Path | bytes  # a file, or the encoded bytes a tar member, a Parquet cell or an HF Image struct holds


def _open_checked(source: ImageInput, where: str, settings: ImageSettings) -> Image.Image:
    """Open and validate from the header alone, so absurd sizes are rejected before decoding."""
    if isinstance(source, Path) and not source.is_file():
        raise SkipSample(MISSING_FILE, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except Image.DecompressionBombError as e:
        raise SkipSample(TOO_LARGE, f"{where}: {e}") from None
    except Exception as e:  # image plugins raise many types on hostile bytes; none may stop the job
        raise SkipSample(CORRUPT_IMAGE, f"{where}: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > settings.max_pixels:
        raise SkipSample(TOO_LARGE, f"{where}: {width}x{height} px > --max-pixels {settings.max_pixels}")
    if min(width, height) < settings.min_side:
        raise SkipSample(TOO_SMALL, f"{where}: {width}x{height} px, side < --min-side {settings.min_side}")
    return image


def _decode_rgb(image: Image.Image, where: str, settings: ImageSettings) -> Image.Image:
    try:
        if image.format == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below S
            image.draft("RGB", (settings.image_size, settings.image_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # as above: a hostile file is a skip, whatever the decoder raises
        reason = TRUNCATED_IMAGE if "truncated" in str(e).lower() else CORRUPT_IMAGE
        raise SkipSample(reason, f"{where}: {type(e).__name__}: {e}") from None


def image_source(value: Any, root: Path, field: str) -> ImageInput:
    """What an input record's image field holds, as something ``load_square_image`` reads: the Hugging Face
    ``Image`` struct (``{"bytes", "path"}``: the bytes when present), encoded bytes (a tar member, a Parquet
    binary column), or a path read inside `root` (``path_under_root``)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise SkipSample(BAD_RECORD, f"{field!r} holds no bytes")
        return bytes(value)
    if isinstance(value, str) and value:
        return path_under_root(root, value)
    raise SkipSample(BAD_RECORD, f"no {field!r} field")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Short side resized to `size` (bicubic), then the centre size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def codebook_view(jpeg: bytes) -> np.ndarray:
    """The dVAE input for a stored image: decoded JPEG, 2x box-reduced, uint8 (S/2, S/2, 3)."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").reduce(2))


def load_square_image(
    source: ImageInput, settings: ImageSettings, where: str | None = None
) -> tuple[bytes, np.ndarray]:
    """Validate, decode, resize and JPEG-encode one image (a file or encoded bytes; `where` names it in skip
    messages, default the path); returns (jpeg bytes, codebook view)."""
    where = where or str(source if isinstance(source, Path) else "<image bytes>")
    image = square_resize(_decode_rgb(_open_checked(source, where, settings), where, settings), settings.image_size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=settings.jpeg_quality)
    jpeg = buffer.getvalue()
    return jpeg, codebook_view(jpeg)


# ---- the dVAE, batched in the main process ---------------------------------------------------------


class CodebookEncoder:
    """Runs the frozen dVAE over codebook views in batches; returns (tokens, tokens of the flipped view)."""

    def __init__(self, spec: str, device: str, batch_size: int):
        import torch

        from flava_ds.model.codebook import load_codebook

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine")
        self.torch = torch
        self.codebook = load_codebook(spec).to(device)
        self.device = device
        self.batch_size = batch_size
        self.fingerprint = self.codebook.fingerprint
        if self.codebook.config.vocab_size > 65536:
            raise ValueError(f"codebook vocab {self.codebook.config.vocab_size} does not fit uint16 tokens")

    def encode(self, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """views: uint8 (h, w, 3) each -> two uint16 arrays (n, (h/8)*(w/8))."""
        torch = self.torch
        plain, flipped = [], []
        for start in range(0, len(views), self.batch_size):
            chunk = np.stack(views[start : start + self.batch_size])
            x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            tokens = self.codebook.get_codebook_indices(torch.cat([x, x.flip(3)]))
            tokens = tokens.flatten(1).to(torch.int32).cpu().numpy().astype(np.uint16)
            plain.append(tokens[: len(chunk)])
            flipped.append(tokens[len(chunk) :])
        return np.concatenate(plain), np.concatenate(flipped)


# ---- shard writing ---------------------------------------------------------------------------------


def image_schema(settings: ImageSettings, extra: Sequence[tuple[str, pa.DataType]], metadata: dict) -> pa.Schema:
    tokens = pa.list_(pa.uint16(), settings.grid**2)
    fields = [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("codebook_tokens", tokens),
        ("codebook_tokens_flipped", tokens),
        *extra,
    ]
    meta = {"image_size": str(settings.image_size), "grid": str(settings.grid), **metadata}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def _column(values: list, dtype: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(dtype):
        flat = pa.array(np.concatenate(values), dtype.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, dtype.list_size)
    return pa.array(values, dtype)


def write_image_shard(
    task: ShardTask,
    prepared: Iterator[dict | SkipSample],
    encoder: CodebookEncoder,
    schema: pa.Schema,
) -> ShardResult:
    """Consume prepared samples (in record order), add dVAE tokens in batches, write one Arrow IPC file.

    A prepared sample is a dict with the schema's columns except the token columns, plus ``view`` and optionally
    ``dropped`` (reasons of parts left out, counted in the manifest)."""
    result = ShardResult(samples=0)
    pending: list[dict] = []
    rows: list[dict] = []

    with pa.OSFile(str(task.tmp_path(".arrow")), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

        def tokenize_pending() -> None:
            tokens, flipped = encoder.encode([p.pop("view") for p in pending])
            for p, t, f in zip(pending, tokens, flipped):
                rows.append({**p, "codebook_tokens": t, "codebook_tokens_flipped": f})
            task.progress(len(pending))
            pending.clear()

        def write_rows(final: bool) -> None:
            while len(rows) >= ROWS_PER_RECORD_BATCH or (final and rows):
                batch, rows[:] = rows[:ROWS_PER_RECORD_BATCH], rows[ROWS_PER_RECORD_BATCH:]
                columns = [_column([r[f.name] for r in batch], f.type) for f in schema]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                result.samples += len(batch)

        for sample in prepared:
            if isinstance(sample, SkipSample):
                result.skip(sample.reason, sample.detail)
                continue
            result.dropped.update(sample.pop("dropped", ()))
            pending.append(sample)
            if len(pending) >= encoder.batch_size:
                tokenize_pending()
                write_rows(final=False)
        if pending:
            tokenize_pending()
        write_rows(final=True)
    return result


def add_image_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("images and the dVAE codebook")
    g.add_argument("--codebook", required=True, help="FlavaImageCodebook directory, or random:SEED[:tiny]")
    g.add_argument("--image-size", type=int, default=256, help="stored side S (multiple of 16)")
    g.add_argument("--min-side", type=int, default=16, help="skip images with a smaller side (too_small)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=8192 * 8192,
        help="skip images whose header claims more pixels (too_large), before decoding",
    )
    g.add_argument("--jpeg-quality", type=int, default=90)
    g.add_argument("--device", default="cpu", help="device for the dVAE (cpu, cuda, cuda:1, ...)")
    g.add_argument("--batch-size", type=int, default=64, help="dVAE batch size")


def image_settings(args: argparse.Namespace) -> ImageSettings:
    return ImageSettings(args.image_size, args.min_side, args.max_pixels, args.jpeg_quality)


def check_image_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ImageSettings:
    """Validate the image and common flags before any worker starts; exits with a usage error."""
    try:
        check_common_args(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not 1 <= args.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {args.jpeg_quality}")
        return image_settings(args)
    except ValueError as e:
        parser.error(str(e))


def run_image_conversion(
    args: argparse.Namespace,
    kind: str,
    inputs: Iterable[ShardInput],
    shard_rows: Sequence[int] | None,
    prepare: Callable[[tuple[int, Any]], dict | SkipSample],
    worker_init: Callable,
    worker_args: tuple,
    extra_columns: Sequence[tuple[str, pa.DataType]],
    fingerprints: dict[str, str],
) -> int:
    """Shared driver of the image converters: pool of `prepare` workers, batched dVAE, resumable shards.

    Callers hold ``output_lock(args)`` already, so a second converter stops before the codebook loads."""
    settings = image_settings(args)
    # fork the workers before torch starts its thread pools
    with worker_pool(args.workers, worker_init, worker_args) as pool:
        encoder = CodebookEncoder(args.codebook, args.device, args.batch_size)
        fingerprints = {"codebook": encoder.fingerprint, **fingerprints}
        schema = image_schema(settings, extra_columns, {"kind": kind, **fingerprints})
        run = ShardedRun(args, kind, fingerprints, (".arrow",), resume_ignore=("device", "batch_size"))

        def convert(task: ShardTask) -> ShardResult:
            return write_image_shard(task, pool.imap(prepare, task.records, chunksize=4), encoder, schema)

        return run.run(inputs, convert, shard_rows)


# ---- the image-only (ImageNet-style) converter -----------------------------------------------------

TABLE_FORMATS = ("parquet", "arrow", "hf")
TABLE_FILE_SUFFIXES = (".parquet", ".arrow")
PROBE_RECORDS = 50  # path images looked up before the codebook loads, to catch a wrong image root
IMAGE_FIELD_TYPES = "an Image struct {bytes, path}, encoded image bytes or a path string"
LABEL_FIELD_TYPES = "integers (a ClassLabel) or class-name strings"

# one input record as the workers take it: (sample id, image path under the image root or encoded bytes, label)
ImageRecord = tuple[str, str | bytes, int]

_worker: dict[str, Any] = {}


def _init_image_worker(settings: ImageSettings, image_root: str) -> None:
    _worker.update(settings=settings, root=Path(image_root))


def prepare_image_record(record: tuple[int, ImageRecord | BadRecord]) -> dict | SkipSample:
    """(record index, (id, image, label) or BadRecord) -> prepared row or the reason to skip."""
    _, payload = record
    if isinstance(payload, BadRecord):
        return SkipSample(BAD_RECORD, f"{payload.where}: {payload.error}")
    sample_id, image, label = payload
    try:
        if isinstance(image, bytes):
            jpeg, view = load_square_image(image, _worker["settings"], sample_id)
        else:
            jpeg, view = load_square_image(path_under_root(_worker["root"], image), _worker["settings"])
    except SkipSample as skip:
        return skip
    return {"id": sample_id, "image": jpeg, "view": view, "label": label}


@dataclass(frozen=True)
class LabelSpace:
    """How an input's label values become integer labels.

    ``classes``: the class ids in label order (folder names, sorted label names, ClassLabel names); a string
    label is its class's index. An integer indexes ``classes`` when ``indexed`` (a ClassLabel: out of range is
    a bad record, e.g. the -1 of unlabelled splits), else it is used as given (list files, plain integer
    columns; ``integers``: those seen)."""

    classes: tuple[str, ...] = ()
    indexed: bool = False
    integers: frozenset[int] = frozenset()

    @classmethod
    def scan(cls, values: Iterable[Any]) -> LabelSpace:
        """Names indexed in sorted order (as list files always were), integers as given; other values are
        ignored here and become bad records when their record is read."""
        names: set[str] = set()
        integers: set[int] = set()
        for value in values:
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                integers.add(value)
        return cls(tuple(sorted(names)), False, frozenset(integers))

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def label(self, value: Any) -> int:
        """The integer label of a label value; ValueError (a bad record) for a value that names no class."""
        if isinstance(value, str):
            if value not in self._index:
                raise ValueError(f"label {value!r} is not one of the input's classes")
            return self._index[value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"label {value!r} is neither an integer nor a class name")
        if self.indexed and not 0 <= value < len(self.classes):
            raise ValueError(f"label {value} is outside the {len(self.classes)} classes")
        return value


@dataclass(frozen=True)
class Corpus:
    """An input as the converter reads it: records in order, their count where known up front (the progress
    bar's total), its labels, and the folder that path images are relative to."""

    records: Iterable[ImageRecord | BadRecord]
    total: int | None
    labels: LabelSpace
    root: Path


def input_kind(paths: Sequence[str]) -> str:
    """``folders`` (one class-folder root), ``list`` (``path label`` files) or the table format of the inputs."""
    kinds = {_kind_of(path) for path in paths}
    if len(kinds) > 1:
        raise InputError(f"--input mixes {sorted(kinds)}; convert each kind in its own run")
    kind = kinds.pop()
    if kind == "folders" and len(paths) > 1:
        raise InputError(f"--input: one class-folder root per run, got {len(paths)}")
    return kind


def _kind_of(path: str) -> str:
    """A directory's kind is that of the first image or table file a sorted walk meets: this stops within the
    first class folder of ImageNet instead of listing the whole tree."""
    local = Path(path)
    if local.is_file():
        return detect_format([path]) if local.suffix.lower() in TABLE_FILE_SUFFIXES else "list"
    if not local.is_dir():
        raise InputError(f"--input {path}: not a local file or directory")
    if (local / "dataset_dict.json").is_file():
        return "hf"  # all splits of a save_to_disk DatasetDict: hf_dataset names them, to pick one
    for _, dirnames, filenames in os.walk(local):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                return "folders"
            if name.lower().endswith(TABLE_FILE_SUFFIXES):
                return detect_format([path])
    raise InputError(f"{path}: no images (root/<class>/<image>) and no .parquet/.arrow tables")


def _is_image_type(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return any(dtype.field(i).name in ("bytes", "path") for i in range(dtype.num_fields))
    return any(check(dtype) for check in (pa.types.is_binary, pa.types.is_large_binary, _is_string_type))


def _is_string_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):  # pandas categories
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_label_type(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or _is_string_type(dtype)


def check_table_fields(paths: Sequence[str], fmt: str, image_field: str, label_field: str) -> None:
    """Every table holds both fields, of types they can be read as (schemas only, no rows): otherwise one line
    naming the file, its columns and the flag to set, before anything heavy runs."""
    checks = (
        ("--image-field", image_field, _is_image_type, IMAGE_FIELD_TYPES),
        ("--label-field", label_field, _is_label_type, LABEL_FIELD_TYPES),
    )
    for path in paths:
        if fmt == "hf":
            schemas = [(path, hf_dataset(path).data.schema)]
        else:
            schemas = [(file, table_schema(file)) for file in table_files(path)]
        for where, schema in schemas:
            for flag, field, accepts, expected in checks:
                try:
                    check_columns(where, schema, [field])
                except InputError as e:
                    raise InputError(f"{e} (set {flag})") from None
                dtype = schema.field(field).type
                if not accepts(dtype):
                    raise InputError(f"{where}: column {field!r} is {dtype}, not {expected} (set {flag})")


def folder_corpus(root: Path) -> Corpus:
    """root/<class>/<image> (sorted, so record order is stable); labels index the sorted class folder names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    records: list[ImageRecord] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    rel = (Path(dirpath) / fname).relative_to(root).as_posix()
                    records.append((rel, rel, label))
    return Corpus(records, len(records), LabelSpace(tuple(classes), indexed=True), root)


def _list_label(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def list_corpus(paths: Sequence[str], root: Path) -> Corpus:
    """``relative/path label`` lines (optionally compressed); the label is an integer (used as given) or a class
    name (the names of all the files are indexed in sorted order)."""
    lines: list[tuple[str, list[str]]] = []
    for path in paths:
        with open_input(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8", "surrogateescape").strip()
                if line:
                    lines.append((f"{path}:{lineno}", line.rsplit(maxsplit=1)))
    labels = LabelSpace.scan(_list_label(parts[1]) for _, parts in lines if len(parts) == 2)
    records = [
        (parts[0], parts[0], labels.label(_list_label(parts[1])))
        if len(parts) == 2
        else BadRecord(where, "expected 'path label'")
        for where, parts in lines
    ]
    return Corpus(records, len(records), labels, root)


def table_corpus(paths: Sequence[str], fmt: str, image_field: str, label_field: str, root: Path) -> Corpus:
    """Rows of Parquet / Arrow / save_to_disk inputs, read as they are converted. A ClassLabel's names are the
    classes; other labels are scanned first (that column alone) for their names and count."""
    found = {tuple(class_label_names(path, label_field) or ()) for path in paths}
    if len(found) > 1:
        raise InputError(f"--input: the {label_field!r} ClassLabel names differ between the inputs; convert each alone")
    names = found.pop()
    blocks = input_blocks(paths, fmt, [image_field, label_field])
    if names:
        labels = LabelSpace(names, indexed=True)
        rows = [block.rows for block in blocks]
        total = None if None in rows else sum(rows)
    else:
        values = [
            record.get(label_field) if isinstance(record, dict) else None
            for block in input_blocks(paths, fmt, [label_field])
            for _, record in block.read()
        ]
        labels, total = LabelSpace.scan(values), len(values)
    return Corpus(_table_records(blocks, image_field, label_field, labels), total, labels, root)


def _table_records(
    blocks: Sequence[Block], image_field: str, label_field: str, labels: LabelSpace
) -> Iterator[ImageRecord | BadRecord]:
    for block in blocks:
        for source_id, record in block.read():
            if isinstance(record, BadRecord):
                yield record
                continue
            try:
                payload = (
                    source_id,
                    _table_image(record.get(image_field), image_field),
                    labels.label(record.get(label_field)),
                )
            except ValueError as e:
                payload = BadRecord(source_id, str(e))
            yield payload


def _table_image(value: Any, field: str) -> str | bytes:
    """The encoded bytes or the path a table cell holds (of an HF Image struct: its bytes, else its path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, str)) and value:
        return value
    raise ValueError(f"no image in {field!r}")


def check_image_root(records: Sequence[ImageRecord | BadRecord], root: Path) -> None:
    """A wrong image root makes every path image a missing file: found from the first records, it is an error
    before the codebook loads instead of a run that skips everything."""
    paths = [r[1] for r in records if not isinstance(r, BadRecord) and isinstance(r[1], str)]
    for rel in paths:
        try:
            if path_under_root(root, rel).is_file():
                return
        except SkipSample:
            continue
    if paths:
        raise InputError(
            f"none of the first {len(paths)} image paths exists under the image root {root} (e.g. {paths[0]!r}); "
            "set --image-root to the folder they are relative to"
        )


@dataclass(frozen=True)
class ClassNamesFile:
    """A --class-names file: readable names by label (a JSON list) or by class id (a JSON object, or
    ``id<TAB>name`` lines; on a line without a tab the first whitespace separates them, as in ImageNet's
    LOC_synset_mapping.txt)."""

    path: Path
    names: list[str] | dict[str, str]

    @classmethod
    def read(cls, path: Path) -> ClassNamesFile:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--class-names {path}: {e}") from None
        if not text.lstrip().startswith(("{", "[")):
            return cls(path, cls._parse_lines(path, text))
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--class-names {path}: invalid JSON: {e}") from None
        values = names.values() if isinstance(names, dict) else names
        if not isinstance(names, (list, dict)) or not all(isinstance(n, str) and n.strip() for n in values):
            raise InputError(f"--class-names {path}: expected a JSON list of names or an object of id -> name")
        return cls(path, names)

    @staticmethod
    def _parse_lines(path: Path, text: str) -> dict[str, str]:
        names: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in (line.split("\t", 1) if "\t" in line else line.split(maxsplit=1))]
            if len(parts) != 2 or not parts[1]:
                raise InputError(f"--class-names {path}:{lineno}: expected 'id<TAB>name'")
            if parts[0] in names:
                raise InputError(f"--class-names {path}:{lineno}: class {parts[0]!r} is named twice")
            names[parts[0]] = parts[1]
        return names

    def error(self, message: str) -> InputError:
        return InputError(f"--class-names {self.path}: {message}")

    def missing(self, ids: Sequence[str]) -> InputError:
        more = f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""
        return self.error(f"no name for class {ids[0]!r}{more} of the input")

    def readable(self, labels: LabelSpace) -> list[str]:
        """The name of each class, in label order. Classes with ids (folder, label or ClassLabel names): a list
        names them by label and must have one name per class, an object by id. Integer labels without names:
        the file lists the classes itself (a list by label, or an object keyed '0', '1', ...)."""
        if labels.classes:
            ids = list(labels.classes)
            if isinstance(self.names, list):
                if len(self.names) != len(ids):
                    raise self.error(f"{len(self.names)} names by label, but the input has {len(ids)} classes")
                return disambiguate(self.names, ids, self)
            missing = [i for i in ids if i not in self.names]
            if missing:
                raise self.missing(missing)
            return disambiguate([self.names[i] for i in ids], ids, self)
        if isinstance(self.names, list):
            names = self.names
        else:
            try:
                numbered = {int(key): name for key, name in self.names.items()}
            except ValueError:
                raise self.error(
                    "the input's labels are integers: name them by a JSON list or ids '0', '1', ..."
                ) from None
            names = [numbered.get(i, "") for i in range(max(numbered, default=-1) + 1)]
        ids = [str(i) for i in range(len(names))]
        missing = [i for i, name in zip(ids, names) if not name]
        missing += [str(i) for i in sorted(labels.integers) if not 0 <= i < len(names)]
        if missing:
            raise self.missing(missing)
        return disambiguate(names, ids, self)


def disambiguate(names: Sequence[str], ids: Sequence[str], source: ClassNamesFile) -> list[str]:
    """classes.json maps name -> label, so a readable name shared by several classes (ImageNet has two 'crane's,
    a bird and a machine, and two 'maillot's) becomes 'name (id)' for each of them, e.g. 'crane (n02012849)';
    every other name stays as given."""
    counts = Counter(names)
    unique = [f"{name} ({i})" if counts[name] > 1 else name for name, i in zip(names, ids)]
    clash = [name for name, n in Counter(unique).items() if n > 1]
    if clash:
        raise source.error(f"class name {clash[0]!r} twice, even with its class id added")
    return unique


def class_index(labels: LabelSpace, names: ClassNamesFile | None) -> dict[str, int] | None:
    """classes.json, ``{name: label}`` (the class names zero-shot evaluation prompts with); None for integer
    labels that nothing names."""
    classes = names.readable(labels) if names else list(labels.classes)
    return {name: i for i, name in enumerate(classes)} if classes else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m preprocess.images")
    g = parser.add_argument_group("input and labels")
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="a class-folder root; 'path label' list files; or .parquet / .arrow files, directories of them, a "
        "datasets.save_to_disk directory (globs are expanded)",
    )
    g.add_argument(
        "--image-root",
        help="folder the image paths of list files and tables are relative to (default: the folder of the first "
        "--input); paths resolving outside it are skipped (outside_image_root)",
    )
    g.add_argument("--image-field", default="image", help=f"table column holding {IMAGE_FIELD_TYPES}")
    g.add_argument("--label-field", default="label", help=f"table column holding {LABEL_FIELD_TYPES}")
    g.add_argument(
        "--class-names",
        type=Path,
        help="readable class names for classes.json: JSON {id: name} or [name by label], or 'id<TAB>name' lines",
    )
    add_image_args(parser)
    add_common_args(parser, default_shard_size=5000)
    return parser


def read_corpus(kind: str, paths: Sequence[str], args: argparse.Namespace) -> Corpus:
    if kind == "folders":
        return folder_corpus(Path(paths[0]))
    root = Path(args.image_root) if args.image_root else Path(paths[0]).parent
    if kind == "list":
        return list_corpus(paths, root)
    return table_corpus(paths, kind, args.image_field, args.label_field, root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = check_image_args(parser, args)
    try:
        paths = expand_inputs(args.input)
        kind = input_kind(paths)
        if kind in TABLE_FORMATS:
            check_table_fields(paths, kind, args.image_field, args.label_field)
        names = ClassNamesFile.read(args.class_names) if args.class_names else None
        # before listing the input (a walk of a large tree, a scan of a label column) and the codebook
        with output_lock(args):
            corpus = read_corpus(kind, paths, args)
            records = iter(corpus.records)
            head = list(itertools.islice(records, PROBE_RECORDS))
            check_image_root(head, corpus.root)
            classes = class_index(corpus.labels, names)
            rc = run_image_conversion(
                args,
                "images",
                fixed_size_shards(itertools.chain(head, records), args.shard_size),
                fixed_size_rows(corpus.total, args.shard_size),
                prepare_image_record,
                _init_image_worker,
                (settings, str(corpus.root)),
                [("label", pa.int64())],
                {},
            )
            # after the run, so a run refused for other settings leaves the earlier output's classes in place
            if classes is not None:
                atomic_write_json(Path(args.output) / "classes.json", classes)
            return rc
    except InputError as e:  # one line, exit code 2 (a usage error), like the other converters
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

"""Image corpora (ImageNet-style class folders or a ``path label`` list file) -> Arrow image shards.

This module also defines the image half of the shard format that ``preprocess/pairs.py`` extends with
text. Every row stores the image once at S x S (short side resized to S, centre crop, JPEG bytes) and
the dVAE token grid of its *codebook view* (the decoded S x S JPEG reduced 2x, pixels in [0, 1]) for
the image and for its horizontal flip, each (S/16)^2 uint16 tokens, row-major. Training crops at
offsets that are multiples of 16 px, so slices of these grids are the MIM targets and the dVAE never
runs during training. Tokens come from the decoded JPEG, i.e. exactly the pixels training sees.

Usage::

    python -m preprocess.images --input /data/imagenet/train --output shards/in1k \\
        --codebook /ckpt/flava-codebook --image-size 256 --workers 15 --device cuda
    python -m preprocess.images --input val_list.txt --image-root /data/imagenet/val --output shards/val ...

Folders: ``root/<class>/<image>``; labels index the sorted class names (written to ``classes.json``).
List file: one ``relative/path label`` per line, label an integer or a class name (names are indexed
in sorted order and written to ``classes.json``; integer labels are used as given).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from preprocess.common import (
    BadRecord,
    ShardedRun,
    ShardResult,
    ShardTask,
    add_common_args,
    atomic_write_json,
    check_common_args,
    output_lock,
    worker_pool,
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


def _open_checked(path: Path, settings: ImageSettings) -> Image.Image:
    """Open and validate from the header alone, so absurd sizes are rejected before decoding."""
    if not path.is_file():
        raise SkipSample(MISSING_FILE, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise SkipSample(TOO_LARGE, f"{path}: {e}") from None
    except Exception as e:  # image plugins raise many types on hostile bytes; none may stop the job
        raise SkipSample(CORRUPT_IMAGE, f"{path}: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > settings.max_pixels:
        raise SkipSample(TOO_LARGE, f"{path}: {width}x{height} px > --max-pixels {settings.max_pixels}")
    if min(width, height) < settings.min_side:
        raise SkipSample(TOO_SMALL, f"{path}: {width}x{height} px, side < --min-side {settings.min_side}")
    return image


def _decode_rgb(image: Image.Image, path: Path, settings: ImageSettings) -> Image.Image:
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
        raise SkipSample(reason, f"{path}: {type(e).__name__}: {e}") from None


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


def load_square_image(path: Path, settings: ImageSettings) -> tuple[bytes, np.ndarray]:
    """Validate, decode, resize and JPEG-encode one image; returns (jpeg bytes, codebook view)."""
    image = square_resize(_decode_rgb(_open_checked(path, settings), path, settings), settings.image_size)
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

    A prepared sample is a dict with the schema's columns except the token columns, plus ``view``."""
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
    records: Iterator[Any],
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

        return run.run(records, convert)


# ---- the image-only (ImageNet-style) converter -----------------------------------------------------

_worker: dict[str, Any] = {}


def _init_image_worker(settings: ImageSettings, image_root: str) -> None:
    _worker.update(settings=settings, root=Path(image_root))


def prepare_image_record(record: tuple[int, tuple[str, Any]]) -> dict | SkipSample:
    """(record index, (relative path, label) or BadRecord) -> prepared row or the reason to skip."""
    _, payload = record
    if isinstance(payload, BadRecord):
        return SkipSample(BAD_RECORD, f"{payload.where}: {payload.error}")
    rel, label = payload
    try:
        jpeg, view = load_square_image(path_under_root(_worker["root"], rel), _worker["settings"])
    except SkipSample as skip:
        return skip
    return {"id": rel, "image": jpeg, "view": view, "label": label}


def folder_records(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """root/<class>/<image> (sorted, so record order is stable) -> ([(relative path, label)], classes)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    records = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    records.append(((Path(dirpath) / fname).relative_to(root).as_posix(), label))
    return records, classes


def list_file_records(path: Path) -> tuple[list[tuple[str, int] | BadRecord], list[str] | None]:
    """``relative/path label`` lines -> records; class names are indexed in sorted order."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if line:
                lines.append((lineno, line.rsplit(maxsplit=1)))
    named = sorted({p[1] for _, p in lines if len(p) == 2 and not p[1].lstrip("-").isdigit()})
    index = {name: i for i, name in enumerate(named)}
    records: list[tuple[str, int] | BadRecord] = []
    for lineno, parts in lines:
        if len(parts) != 2:
            records.append(BadRecord(f"{path}:{lineno}", "expected 'path label'"))
        elif parts[1] in index:
            records.append((parts[0], index[parts[1]]))
        else:
            records.append((parts[0], int(parts[1])))
    return records, named or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m preprocess.images")
    parser.add_argument("--input", required=True, help="class-folder root, or a list file of 'path label' lines")
    parser.add_argument("--image-root", help="root for the list file's paths (default: the list file's folder)")
    add_image_args(parser)
    add_common_args(parser, default_shard_size=5000)
    args = parser.parse_args(argv)
    settings = check_image_args(parser, args)
    source = Path(args.input)
    if not (source.is_dir() or source.is_file()):
        parser.error(f"--input {source}: no such file or directory")
    # before listing the input (a walk of a large tree) and the codebook; classes.json is output too
    with output_lock(args):
        if source.is_dir():
            records, classes = folder_records(source)
            root = source
        else:
            records, classes = list_file_records(source)
            root = Path(args.image_root) if args.image_root else source.parent
        if classes is not None:
            atomic_write_json(Path(args.output) / "classes.json", {name: i for i, name in enumerate(classes)})
        return run_image_conversion(
            args,
            "images",
            iter(records),
            prepare_image_record,
            _init_image_worker,
            (settings, str(root)),
            [("label", pa.int64())],
            {},
        )


if __name__ == "__main__":
    sys.exit(main())

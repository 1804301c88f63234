"""One image, from an input record to what a shard stores: validated from its header, decoded (EXIF rotation,
transparency on white), short side resized to S, centre-cropped, JPEG-encoded, plus its codebook view. Runs in
the converters' worker processes; every problem with one image is a ``SkipSample`` with its reason, never an
exception that stops the run.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from preprocess.input_records import BAD_RECORD

# skip reasons (manifest keys)
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
    """How images are stored; each field is also the converter flag of its name (``add_settings_flags``)."""

    image_size: int = field(default=256, metadata={"help": "stored side S (multiple of 16)"})
    min_side: int = field(default=16, metadata={"help": f"skip images with a smaller side ({TOO_SMALL})"})
    max_pixels: int = field(
        default=8192 * 8192,
        metadata={"help": f"skip images whose header claims more pixels ({TOO_LARGE}), before decoding"},
    )
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"--image-size must be a positive multiple of 16, got {self.image_size}")

    @property
    def grid(self) -> int:
        """Token grid side: the dVAE maps the S/2 codebook view to an S/16 grid."""
        return self.image_size // 16


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

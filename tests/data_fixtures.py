"""Small on-disk image and image-text corpora for the data tests: a WordPiece tokenizer over their captions' words,
images, pairs files (incl. hostile ones)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.text_fixtures import SPECIALS, write_jsonl

WORDS = (
    "a dog cat runs on the grass under blue sky with red ball near old tree small house big car "
    "people walk street city night light water river boat green field"
).split()
CODEBOOK = "random:0:tiny"


def make_tokenizer(directory: Path) -> Path:
    """An uncased WordPiece tokenizer.json with [PAD]=0, trained on the fixture vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    path = Path(directory) / "tokenizer.json"
    tok.save(str(path))
    return path


def caption(rng: np.random.Generator, n_words: int = 6) -> str:
    return " ".join(rng.choice(WORDS, size=n_words))


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients plus noise: compresses like a photo, varied enough for distinct tokens."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2))
    channels = [base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_images(root: Path, n: int, seed: int = 0, sizes=((120, 90), (90, 130), (100, 100))) -> list[str]:
    """n JPEG/PNG files of varied shapes under root/img; returns paths relative to root."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        ext = "png" if i % 5 == 4 else "jpg"
        name = f"img/{i:04d}.{ext}"
        random_image(rng, w, h).save(root / name)
        names.append(name)
    return names


def make_pairs(root: Path, n: int, seed: int = 0) -> Path:
    """root/pairs.jsonl with n clean image-caption pairs (images under root/img) and root/tokenizer.json: the corpus
    `pairs_args` converts."""
    make_tokenizer(root)
    rng = np.random.default_rng(seed + 1)
    names = write_images(root, n, seed)
    records = [{"image": p, "caption": caption(rng, int(rng.integers(4, 12)))} for p in names]
    return write_jsonl(root / "pairs.jsonl", records)


def pairs_args(
    root: Path, output: Path, *extra: str, inputs: tuple[str, ...] = ("pairs.jsonl",), shard_size: int = 8
) -> list[str]:
    """Command-line arguments of preprocess.pairs for a fixture corpus (S = 80, tiny codebook)."""
    return [
        "--input",
        *(str(root / i) for i in inputs),
        "--image-root",
        str(root),
        "--output",
        str(output),
        "--tokenizer",
        str(root / "tokenizer.json"),
        "--codebook",
        CODEBOOK,
        "--image-size",
        "80",
        "--shard-size",
        str(shard_size),
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file whose PNG header claims width x height pixels (a decompression bomb stand-in)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def write_hostile_jsonl(root: Path, rng: np.random.Generator) -> tuple[list[bytes], dict[str, int]]:
    """Hostile JSONL lines (raw bytes, one problem each) and the skip counts they must produce."""
    img = root / "bad"
    img.mkdir(parents=True, exist_ok=True)
    (img / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    png = io.BytesIO()
    random_image(rng, 100, 80).save(png, "PNG")
    (img / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(img / "tiny.png")
    (img / "huge.png").write_bytes(huge_png_header())  # beyond PIL's own decompression-bomb limit
    (img / "big.png").write_bytes(huge_png_header(9000, 9000))  # under PIL's limit, over --max-pixels
    good = "img/0000.jpg"

    def line(image: str, cap: str | bytes) -> bytes:
        if isinstance(cap, bytes):  # raw non-UTF-8 bytes inside the JSON string
            return b'{"image": "' + image.encode() + b'", "caption": "' + cap + b'"}\n'
        return json.dumps({"image": image, "caption": cap}).encode() + b"\n"

    lines = [
        line("bad/corrupt.jpg", caption(rng)),
        line("bad/truncated.png", caption(rng)),
        line("bad/does_not_exist.jpg", caption(rng)),
        line(good, ""),
        line(good, "   "),
        line(good, b"caf\xe9 au lait on a table \xff\xfe"),
        line("bad/tiny.png", caption(rng)),
        line("bad/huge.png", caption(rng)),
        line("bad/big.png", caption(rng)),
        line(good, "two words"),
        b"{not json at all\n",
    ]
    expected = {
        "corrupt_image": 1,
        "truncated_image": 1,
        "missing_file": 1,
        "empty_caption": 2,
        "caption_not_utf8": 1,
        "too_small": 1,
        "too_large": 2,
        "too_few_words": 1,
        "bad_record": 1,
    }
    return lines, expected

"""Shards for the training benchmarks, made by the real preprocess tools, and the trainer's own loader over them.

`make_shards` writes image-text, image-only and text shards (random images, a small WordPiece vocabulary, the tiny
random dVAE codebook; a model's cost does not depend on the values); `make_streams` opens them as
`flava_ds.train.streams.TrainStreams`, one resumable stream per batch kind, as a training run does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tools.make_demo_data import write_jsonl

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "a man woman child dog cat sits stands runs on in near the red blue green old new small large street "
    "beach field table car bike boat house tree sky water park city window with under over two three"
).split()


# ---- data ---------------------------------------------------------------------------------------------
def make_shards(
    root: Path, stored_size: int, pairs: int, docs: int, workers: int = 1, seed: int = 0
) -> dict[str, Path]:
    """Image-text, image-only and text shards made by the real preprocess tools (tiny random dVAE).

    Captions are 4-40 words (ragged, so dynamic padding is exercised); images are stored at `stored_size`."""
    from preprocess import images as prep_images
    from preprocess import pairs as prep_pairs
    from preprocess import text as prep_text

    rng = np.random.default_rng(seed)
    for folder in ("img", "classes/a", "classes/b"):  # image-only corpus: ImageNet-style class folders
        (root / folder).mkdir(parents=True)
    records = []
    for i in range(pairs):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((stored_size + 40, stored_size + 20), Image.BICUBIC)
        image.save(root / "img" / f"{i:05d}.jpg", quality=90)
        if i % 2 == 0:
            image.save(root / "classes" / "ab"[i % 4 // 2] / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(4, 41))))
        records.append({"image": f"img/{i:05d}.jpg", "caption": caption})
    write_jsonl(root / "pairs.jsonl", records)
    documents = [{"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 400))))} for _ in range(docs)]
    write_jsonl(root / "docs.jsonl", documents)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_tokenizer.py"),
            "--input",
            str(root / "pairs.jsonl"),
            "--json-key",
            "caption",
            "--vocab-size",
            "400",
            "--output",
            str(root / "tokenizer.json"),
        ],
        check=True,
        capture_output=True,
    )
    tokenizer = str(root / "tokenizer.json")
    common = [
        "--codebook",
        "random:0:tiny",
        "--image-size",
        str(stored_size),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    checks = [
        prep_pairs.main(
            [
                "--input",
                str(root / "pairs.jsonl"),
                "--image-root",
                str(root),
                "--output",
                str(root / "pairs"),
                "--tokenizer",
                tokenizer,
                *common,
            ]
        ),
        prep_images.main(["--input", str(root / "classes"), "--output", str(root / "images"), *common]),
        prep_text.main(
            [
                "--input",
                str(root / "docs.jsonl"),
                "--tokenizer",
                tokenizer,
                "--output",
                str(root / "text"),
                "--workers",
                "1",
                "--no-progress",
            ]
        ),
    ]
    if any(checks):
        raise SystemExit(f"preprocessing failed (exit codes {checks})")
    return {
        "tokenizer": root / "tokenizer.json",
        "image_text": root / "pairs",
        "image": root / "images",
        "text": root / "text",
    }


def existing_shards(directory: Path) -> dict[str, Path]:
    """A --data directory laid out like `make_shards` writes it."""
    shards = {
        "tokenizer": directory / "tokenizer.json",
        "image_text": directory / "pairs",
        "image": directory / "images",
        "text": directory / "text",
    }
    missing = [str(p) for p in shards.values() if not p.exists()]
    if missing:
        raise SystemExit(f"--data {directory}: missing {missing}")
    return shards


def make_streams(
    shards: dict[str, Path], ratios: dict[str, float], crop: int, micro: int, workers: int, text_max_length: int
):
    """The trainer's own loader: one resumable stream per kind, the task mixer, the data-wait clock."""
    from flava_ds.data.tokenizer import Tokenizer
    from flava_ds.train.config import DataSection, StreamConfig
    from flava_ds.train.streams import TrainStreams

    section = DataSection(
        tokenizer=str(shards["tokenizer"]),
        image_text=StreamConfig(paths=[str(shards["image_text"])]),
        image=StreamConfig(paths=[str(shards["image"])]),
        text=StreamConfig(paths=[str(shards["text"])]),
        task_ratios=ratios,
        text_max_length=text_max_length,
        num_workers=workers,
    )
    return TrainStreams(section, Tokenizer.from_file(section.tokenizer), crop, micro)

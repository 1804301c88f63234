#!/usr/bin/env python
"""Raw demo corpora from real data that ships inside installed packages (no network).

  python tools/make_demo_data.py --output runs/demo/raw [--heldout-fraction 0.2] [--limit N]

* scikit-learn's bundled handwritten digits (1,797 8x8 scans), upscaled, as image-text pairs with
  varied caption templates (`pairs_train.jsonl`, `pairs_heldout.jsonl`) and as ImageNet-style class
  folders (`classes_train/seven/...`, `classes_heldout/...`);
* the Python standard library's bundled documentation (`pydoc_data.topics`) as a text corpus, one
  paragraph per document (`text_train.jsonl`, `text_heldout.jsonl`);
* `tokenizer_corpus.jsonl`: captions and documents, for training the demo tokenizer.
The held-out split is a fixed, class-stratified fraction of the digits.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten number {word}",
    "the digit {digit} written by hand",
    "a picture of the number {word}",
    "a handwritten digit {word} on a dark background",
    "the number {word} drawn by hand",
    "an image of a handwritten {digit}",
    "a scan of the handwritten digit {word}",
    "someone wrote the digit {word} with a pen",
]
IMAGE_SIZE = 96  # upscaled from 8x8; preprocessing stores it at the model's size


def digit_image(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 scan (0..16) -> a smooth RGB image with a slightly varied ink colour."""
    gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    ink = rng.uniform(0.7, 1.0, size=3)
    rgb = np.asarray(gray, dtype=np.float32)[..., None] * ink
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_jsonl(path: Path, records: Iterable[dict], opener: Callable[..., IO[str]] = open) -> Path:
    """One JSON object a line, the form the converters and the tokenizer trainer read (the benchmarks and the tests
    write with it too); `opener` (gzip.open, zstandard.open, ...) for a compressed file."""
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--limit", type=int, help="use only the first N digits (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    from sklearn.datasets import load_digits

    out = Path(args.output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images, labels = digits.images[: args.limit], digits.target[: args.limit]
    rng = np.random.default_rng(args.seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for label in range(10):  # class-stratified split
        members = rng.permutation(np.flatnonzero(labels == label))
        heldout[members[: round(len(members) * args.heldout_fraction)]] = True

    pairs: dict[str, list[dict]] = {"train": [], "heldout": []}
    for i, (pixels, label) in enumerate(zip(images, labels)):
        split = "heldout" if heldout[i] else "train"
        name = f"images/{i:04d}.png"
        image = digit_image(pixels, rng)
        image.save(out / name)
        class_dir = out / f"classes_{split}" / WORDS[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{i:04d}.png")
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        pairs[split].append({"image": name, "caption": template.format(word=WORDS[label], digit=label)})
    for split, records in pairs.items():
        write_jsonl(out / f"pairs_{split}.jsonl", records)

    documents = []
    for topic in sorted(topics):
        for paragraph in topics[topic].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text.split()) >= 5:
                documents.append({"text": text})
    cut = int(len(documents) * (1 - args.heldout_fraction))  # topics are sorted: the split is reproducible
    write_jsonl(out / "text_train.jsonl", documents[:cut])
    write_jsonl(out / "text_heldout.jsonl", documents[cut:])
    captions = [{"text": r["caption"]} for records in pairs.values() for r in records]
    write_jsonl(out / "tokenizer_corpus.jsonl", captions + documents)
    print(
        f"demo data in {out}: {len(pairs['train'])} train / {len(pairs['heldout'])} held-out digits, "
        f"{len(documents)} text documents"
    )


if __name__ == "__main__":
    main()

"""Look inside a preprocessing output: manifest summary, a few decoded samples, optionally a PNG contact sheet.

    python tools/inspect_shards.py shards/cc3m -n 4 [--tokenizer tokenizer.json] [--png sheet.png]

The PNG shows each sample's stored image with a BEiT block mask drawn over the patch grid (the masked
patches darkened, as MIM would see them) and its caption or label underneath.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flava_ds.data.arrow_dataset import ArrowShards
from flava_ds.data.image_dataset import PATCH, block_masker
from flava_ds.data.sampler import SampleKey, sample_rng
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.shard_format import CAPTIONS, CODEBOOK_TOKENS, ID, IMAGE, INPUT_IDS, LABEL, manifest_paths


def summarize(directory: Path) -> str:
    lines = []
    manifests = manifest_paths(directory)
    totals: Counter = Counter()
    skipped: Counter = Counter()
    for path in manifests:
        m = json.loads(path.read_text())
        size = sum(f["size"] for s in m["shards"] for f in s["files"])
        lines.append(
            f"{path.name}: kind={m['kind']} complete={m['complete']} shards={len(m['shards'])} "
            f"inputs={m['inputs_seen']} written={m['samples_written']} bytes={size:,} "
            f"skip={m['skip_check']['fraction']:.4f} (max {m['skip_check']['max']})"
        )
        lines.append(f"  fingerprints: {m['fingerprints']}")
        totals.update(inputs=m["inputs_seen"], written=m["samples_written"], bytes=size)
        skipped.update(m["skipped"])
    lines.append(f"total: {dict(totals)}; skipped by reason: {dict(sorted(skipped.items())) or 'none'}")
    return "\n".join(lines)


def describe(row: dict, tokenizer: Tokenizer | None) -> str:
    image = Image.open(io.BytesIO(row[IMAGE]))
    tokens = row[CODEBOOK_TOKENS]
    parts = [
        f"id={row[ID]}",
        f"image={image.format} {image.size[0]}x{image.size[1]} {len(row[IMAGE]):,} B",
        f"codebook grid {int(len(tokens) ** 0.5)}^2, {len(np.unique(tokens))} distinct tokens",
    ]
    if LABEL in row:
        parts.append(f"label={row[LABEL]}")
    for n, caption in enumerate(row.get(CAPTIONS, [])):
        ids = row[INPUT_IDS][n].tolist()
        parts.append(f"caption {n}={caption!r}")
        parts.append(f"input_ids({len(ids)})={ids[:24]}{' ...' if len(ids) > 24 else ''}")
        if tokenizer is not None:
            parts.append(f"decoded={tokenizer.decode(ids)!r}")
    return "\n  ".join(parts)


def contact_sheet(shards: ArrowShards, indices: list[int], seed: int) -> Image.Image:
    size = int(shards.metadata["image_size"])
    grid = size // PATCH
    masker = block_masker(grid)
    text_h, cols = 64, min(4, len(indices))
    rows = -(-len(indices) // cols)
    sheet = Image.new("RGB", (cols * (size + 8), rows * (size + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, index in enumerate(indices):
        row = shards.row(index)
        pixels = np.asarray(Image.open(io.BytesIO(row[IMAGE])).convert("RGB")).copy()
        mask = masker(sample_rng(seed, SampleKey(index)))
        shade = np.kron(mask, np.ones((PATCH, PATCH), dtype=bool))
        pixels[shade] //= 4
        x, y = (n % cols) * (size + 8) + 4, (n // cols) * (size + text_h + 8) + 4
        sheet.paste(Image.fromarray(pixels), (x, y))
        text = row[CAPTIONS][0] if CAPTIONS in row else f"label {row.get(LABEL)}"
        wrapped = textwrap.wrap(f"{row[ID]}: {text}", width=max(12, size // 6))[:5]
        draw.multiline_text((x, y + size + 2), "\n".join(wrapped), fill="black")
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("-n", "--samples", type=int, default=4, help="samples to decode and print")
    parser.add_argument("--tokenizer", help="decode input_ids back to text with this tokenizer")
    parser.add_argument("--png", type=Path, help="write a contact sheet of the samples here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled indices and masks")
    parser.add_argument("--verify-checksums", action="store_true", help="also check every shard's sha256")
    args = parser.parse_args(argv)
    print(summarize(args.directory))
    shards = ArrowShards(args.directory, verify_checksums=args.verify_checksums)
    print(f"{len(shards)} rows in {len(shards.files)} files; columns {shards.column_names}; {shards.metadata}")
    rng = np.random.default_rng(args.seed)
    indices = sorted(rng.choice(len(shards), size=min(args.samples, len(shards)), replace=False).tolist())
    tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    for index in indices:
        print(f"[{index}] {describe(shards.row(index), tokenizer)}")
    if args.png and indices:
        contact_sheet(shards, indices, args.seed).save(args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

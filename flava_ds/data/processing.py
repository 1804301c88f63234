"""The processing record: how training turned raw text and images into model inputs, kept beside every checkpoint
and export as `processing.json` plus a copy of the tokenizer file, so that a model never travels without them.

    {"tokenizer": {"kind": "tokenizer.json" | "vocab.txt" | "sentencepiece", "file": the copy's name,
                   "fingerprint": the file's sha256 prefix, "lowercase": vocab.txt's lower-casing} or null,
     "image": {"resize_shortest_edge": S, "crop_size": C, "resample": "bicubic", "mean": [3], "std": [3]}}

The image entry is `eval_pixels` (short side to S, centre crop C, CLIP normalisation as ImageAugment's crops get);
S = C = the model's image size. `load_processing` gives back the tokenizer (checked against its fingerprint) and
that transform; `flava_ds.model.hf_export` writes their transformers equivalents.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flava_ds.data.image_dataset import CLIP_MEAN, CLIP_STD, eval_pixels
from flava_ds.data.tokenizer import CANONICAL_NAMES, Tokenizer, TokenizerError

PROCESSING = "processing.json"


def processing_record(tokenizer: Tokenizer | None, image_size: int) -> dict[str, Any]:
    """The record of a run with `tokenizer` (None: an image-only run) and a model of `image_size` px."""
    entry = None
    if tokenizer is not None:
        entry = {
            "kind": tokenizer.kind,
            "file": CANONICAL_NAMES[tokenizer.kind],
            "fingerprint": tokenizer.fingerprint,
            "lowercase": tokenizer.lowercase,
        }
    image = {
        "resize_shortest_edge": image_size,
        "crop_size": image_size,
        "resample": "bicubic",
        "mean": CLIP_MEAN.tolist(),
        "std": CLIP_STD.tolist(),
    }
    return {"tokenizer": entry, "image": image}


def tokenizer_copy(tokenizer: Tokenizer | None) -> dict[str, Path]:
    """The file to copy beside `processing.json` (its name there -> the tokenizer file), none without a tokenizer."""
    return {} if tokenizer is None else {CANONICAL_NAMES[tokenizer.kind]: tokenizer.path}


@dataclass(frozen=True)
class Processing:
    """A directory's processing record, loaded: its tokenizer (None: image-only) and image settings."""

    tokenizer: Tokenizer | None
    image: dict[str, Any]

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """A raw image -> the (3, C, C) pixel_values the model was trained to see."""
        return eval_pixels(image, self.image["resize_shortest_edge"], self.image["crop_size"])


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """`directory`'s processing.json; None where there is none (checkpoints from before it was recorded)."""
    path = Path(directory) / PROCESSING
    return json.loads(path.read_text()) if path.is_file() else None


def load_processing(directory: str | Path) -> Processing | None:
    """The tokenizer and image settings recorded in `directory` (a checkpoint tag or an export), None without a
    record; the tokenizer copy must be the file training used (its fingerprint)."""
    record = read_record(directory)
    if record is None:
        return None
    entry, tokenizer = record["tokenizer"], None
    if entry is not None:
        tokenizer = Tokenizer.from_file(Path(directory) / entry["file"], lowercase=entry["lowercase"])
        if tokenizer.fingerprint != entry["fingerprint"]:
            raise TokenizerError(
                f"{tokenizer.path}: fingerprint {tokenizer.fingerprint}, but {Path(directory) / PROCESSING} records "
                f"{entry['fingerprint']}: the tokenizer file was replaced; put back the file the model was trained with"
            )
    return Processing(tokenizer, record["image"])


def copy_processing(source: str | Path, target: str | Path) -> bool:
    """Copy processing.json and the tokenizer copy it names from `source` into `target`; False if there is none."""
    record = read_record(source)
    if record is None:
        return False
    names = [PROCESSING] + ([record["tokenizer"]["file"]] if record["tokenizer"] else [])
    for name in names:
        shutil.copyfile(Path(source) / name, Path(target) / name)
    return True

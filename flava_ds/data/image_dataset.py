"""Arrow shard rows -> model inputs of the image side: image-only batches, and the image half of image-text ones.

Per sample: decode the stored S x S JPEG, take a C x C crop (C = 224 for FLAVA-full) at offsets that are multiples
of 16 px, flip it horizontally with probability 1/2, and take the matching (C/16)^2 slice of the stored dVAE token
grid (of the flipped image when flipped) as MIM labels, so the dVAE never runs here. A BEiT block mask is drawn on
the patch grid (docs/DESIGN.md §2-3).

Stored codebook tokens are checked per sample (`tolerant.check_ids`, so a bad sample is replaced and counted, its
file and row named in the log) against the size of the codebook the manifest records (``--codebook``), which the
start-up check (`flava_ds.train.preflight`) compares with the model's ``image.codebook_vocab_size``.

Every random choice comes from ``sampler.sample_rng(seed, key, IMAGE_STREAM)`` of the sample's ``SampleKey``
(index, epoch), so a sample's tensors are a pure function of (seed, epoch, index) and a resumed run reproduces an
uninterrupted one exactly. Datasets take a ``SampleKey`` (what the resumable sampler yields) or a plain index
(epoch 0). An image-only `Batch`: ``pixel_values`` (B, 3, C, C) float32 CLIP-normalised, ``bool_masked_pos``
(B, P) bool, ``mim_labels`` (B, P) long: codebook tokens of ALL P = (C/16)^2 patches, row-major.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flava_ds.batch import Batch
from flava_ds.data.arrow_dataset import ArrowShards
from flava_ds.data.masking import BlockMaskGenerator
from flava_ds.data.sampler import SampleKey, sample_rng
from flava_ds.data.tolerant import check_ids
from flava_ds.model.codebook import CodebookConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PATCH = 16
# BEiT's mask for the 14x14 grid; smaller grids get the same fractions
REFERENCE_PATCHES, REFERENCE_MASKED, REFERENCE_MIN_BLOCK = 196, 75, 16
IMAGE_STREAM = 1  # sample_rng(seed, key, IMAGE_STREAM); the bare sample_rng(seed, key) is the MLM stream


def codebook_size(spec: str | None) -> int | None:
    """The number of codes of the codebook a ``--codebook`` spec names (`random:SEED[:preset]` or a directory), or
    None where it cannot be known here: not recorded (older manifests) or a directory absent on this machine."""
    if not spec:
        return None
    if spec.startswith("random:"):
        parts = spec.split(":")
        return (CodebookConfig.preset(parts[2]) if len(parts) > 2 else CodebookConfig()).vocab_size
    config = Path(spec) / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text()).get("vocab_size", CodebookConfig.vocab_size))


def block_masker(
    grid: int,
    num_masking_patches: int | None = None,
    min_num_patches: int | None = None,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
) -> BlockMaskGenerator:
    """BEiT block masking on a grid x grid patch grid; defaults are 75 / min 16 on 14x14, scaled by area."""
    scale = grid * grid / REFERENCE_PATCHES
    num = num_masking_patches or max(1, round(REFERENCE_MASKED * scale))
    low = min_num_patches or max(1, min(num, round(REFERENCE_MIN_BLOCK * scale)))
    return BlockMaskGenerator((grid, grid), num, low, max_num_patches, min_aspect)


def crop_with_tokens(
    jpeg: bytes,
    tokens: np.ndarray,
    tokens_flipped: np.ndarray,
    crop: int,
    rng: np.random.Generator,
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A crop of the stored image and its MIM labels: (uint8 (crop, crop, 3) view, int64 ((crop/16)^2,)).

    The crop's top-left corner is (oy, ox), multiples of 16. Flipped, the crop's pixels are the mirror
    of columns [ox, ox + crop) of the stored image, i.e. columns [S - ox - crop, S - ox) of the flipped
    image, whose token grid is ``tokens_flipped``.
    """
    decoded = Image.open(io.BytesIO(jpeg))
    image = np.asarray(decoded if decoded.mode == "RGB" else decoded.convert("RGB"))
    size = image.shape[0]
    grid, cells = size // PATCH, crop // PATCH
    if crop % PATCH or crop > size:
        raise ValueError(f"crop {crop} must be a multiple of {PATCH} and at most the stored size {size}")
    positions = (size - crop) // PATCH + 1
    oy, ox = (int(v) * PATCH for v in rng.integers(0, positions, size=2))
    flipped = flip and bool(rng.random() < 0.5)
    pixels = image[oy : oy + crop, ox : ox + crop]
    if flipped:
        pixels, grid_tokens, gx = pixels[:, ::-1], tokens_flipped, (size - ox - crop) // PATCH
    else:
        grid_tokens, gx = tokens, ox // PATCH
    gy = oy // PATCH
    labels = grid_tokens.reshape(grid, grid)[gy : gy + cells, gx : gx + cells]
    return pixels, labels.reshape(-1).astype(np.int64)


# per channel, uint8 value -> CLIP-normalised float32: a table lookup is several times faster than the arithmetic
_NORMALIZED = ((np.arange(256)[None] / 255.0 - CLIP_MEAN[:, None]) / CLIP_STD[:, None]).astype(np.float32)


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> CLIP-normalised float32 (3, H, W)."""
    planes = pixels.transpose(2, 0, 1)
    out = np.empty(planes.shape, dtype=np.float32)
    for channel in range(3):
        np.take(_NORMALIZED[channel], planes[channel], out=out[channel])
    return torch.from_numpy(out)


def eval_pixels(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """A raw image -> (3, crop, crop) CLIP-normalised pixel_values for evaluation and inference, no augmentation:
    transparency onto white and the short side resized to `resize` (bicubic), as preprocessing stores images, then
    the centre crop, as training crops. Sizes are rounded as transformers' FlavaImageProcessor rounds them (long
    side truncated), so an exported preprocessor_config.json gives these same pixels."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("RGB")
    if crop > resize:
        raise ValueError(f"crop {crop} must be at most the resized short side {resize}")
    width, height = image.size
    long = int(resize * max(width, height) / min(width, height))
    size = (resize, long) if width <= height else (long, resize)
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return normalize(np.asarray(image.crop((left, top, left + crop, top + crop))))


@dataclass
class ImageAugment:
    """What the image side of a sample needs: crop size, flip, the patch mask."""

    crop_size: int = 224
    flip: bool = True
    masker: BlockMaskGenerator | None = None  # None = block_masker(crop_size // 16)

    def __post_init__(self):
        if self.crop_size % PATCH:
            raise ValueError(f"crop_size must be a multiple of {PATCH}, got {self.crop_size}")
        self.masker = self.masker or block_masker(self.crop_size // PATCH)


class ImageDataset(torch.utils.data.Dataset):
    """Image-only samples (MIM) from an image or image-text shard directory."""

    def __init__(self, shards: ArrowShards | str | Path, augment: ImageAugment | None = None, seed: int = 0):
        self.shards = shards if isinstance(shards, ArrowShards) else ArrowShards(shards)
        self.augment = augment or ImageAugment()
        self.seed = seed
        stored = int(self.shards.metadata.get("image_size", 0))
        if stored < self.augment.crop_size:
            raise ValueError(
                f"{self.shards.directory}: stored images are {stored} px, smaller than the "
                f"crop {self.augment.crop_size}"
            )
        self.codebook_size = codebook_size(self.shards.args.get("codebook"))

    def __len__(self) -> int:
        return len(self.shards)

    def _key(self, key: SampleKey | int) -> SampleKey:
        return key if isinstance(key, SampleKey) else SampleKey(int(key))

    def image_sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        row = self.shards.row(index, ("image", "codebook_tokens", "codebook_tokens_flipped"))
        if self.codebook_size is not None:
            for column in ("codebook_tokens", "codebook_tokens_flipped"):
                check_ids(row[column], self.codebook_size, "codebook token", self.shards.location(index))
        pixels, labels = crop_with_tokens(
            row["image"],
            row["codebook_tokens"],
            row["codebook_tokens_flipped"],
            self.augment.crop_size,
            rng,
            self.augment.flip,
        )
        mask = self.augment.masker(rng)
        return {
            "pixel_values": normalize(pixels),
            "bool_masked_pos": torch.from_numpy(mask.reshape(-1)),
            "mim_labels": torch.from_numpy(labels),
        }

    def rng(self, key: SampleKey) -> np.random.Generator:
        """The image side's generator: its own stream, independent of the MLM masking stream."""
        return sample_rng(self.seed, key, IMAGE_STREAM)

    def __getitem__(self, key: SampleKey | int) -> dict[str, torch.Tensor]:
        key = self._key(key)
        return self.image_sample(key.index, self.rng(key))

    def collator(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The collate function that turns this dataset's samples into the model's batch dict."""
        return collate_image


def collate_image(samples: Sequence[dict[str, Any]]) -> Batch:
    return Batch(**image_inputs(samples))


def image_inputs(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The image inputs of a batch (also those of an image-text batch)."""
    return {key: torch.stack([s[key] for s in samples]) for key in ("pixel_values", "bool_masked_pos", "mim_labels")}

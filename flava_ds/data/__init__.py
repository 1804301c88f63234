"""Readers, masking, samplers and batch building: shards on disk -> the model's batch dicts (SPEC section 8)."""

from flava_ds.data.arrow_dataset import ArrowShards, ShardError
from flava_ds.data.image_text import (
    ImageAugment,
    ImageDataset,
    ImageTextCollator,
    ImageTextDataset,
    block_masker,
    collate_image,
)

__all__ = [
    "ArrowShards",
    "ImageAugment",
    "ImageDataset",
    "ImageTextCollator",
    "ImageTextDataset",
    "ShardError",
    "block_masker",
    "collate_image",
]

"""Arrow shard rows -> image-text batches: the image side of `image_dataset` plus a caption (docs/DESIGN.md §2-3).

A sample's caption is replaced with probability ``itm_negative_prob`` by a random other sample's caption (an ITM
negative); the collator pads the captions and masks them (whole-word MLM) exactly like text-only batches. Caption
ids are checked per sample against the tokenizer's vocabulary. The image side and the ITM draw share the image
stream of ``sample_rng``; MLM masking has the text collator's own stream, so a sample's tensors are a pure function
of (seed, epoch, index).

An image-text `Batch`: the image-only inputs plus ``input_ids``, ``input_ids_masked``, ``attention_mask`` (1 =
token), ``mlm_labels`` (-100 where not masked and at padding), all (B, L) long with L the longest caption in the
batch, and ``itm_labels`` (B,) long (1 = matched caption, 0 = negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flava_ds.batch import Batch
from flava_ds.data.arrow_dataset import ArrowShards
from flava_ds.data.image_dataset import ImageAugment, ImageDataset, image_inputs
from flava_ds.data.sampler import SampleKey
from flava_ds.data.text_dataset import TextCollator
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.data.tolerant import check_ids


class ImageTextDataset(ImageDataset):
    """Image-text samples: the image side of ImageDataset plus the caption (or an ITM negative's).

    MLM masking happens in the collator, the same ``TextCollator`` as text-only batches; build it
    with ``collator()`` so that it shares this dataset's seed, tokenizer and masking settings.
    """

    def __init__(
        self,
        shards: ArrowShards | str | Path,
        tokenizer: Tokenizer,
        augment: ImageAugment | None = None,
        seed: int = 0,
        itm_negative_prob: float = 0.1,
        mlm_prob: float = 0.15,
        whole_word: bool = True,
    ):
        super().__init__(shards, augment, seed)
        expected = self.shards.fingerprints.get("tokenizer")
        if expected != tokenizer.fingerprint:
            raise ValueError(
                f"{self.shards.directory} was tokenized with tokenizer {expected}, "
                f"but {tokenizer.path} is {tokenizer.fingerprint}"
            )
        if len(self.shards) < 2 and itm_negative_prob > 0:
            raise ValueError(f"{self.shards.directory}: ITM negatives need at least 2 samples")
        self.tokenizer = tokenizer
        self.itm_negative_prob = itm_negative_prob
        self.mlm_prob = mlm_prob
        self.whole_word = whole_word

    def captions(self, index: int) -> list[np.ndarray]:
        """The token ids of every caption of sample `index` (int64, checked against the vocabulary)."""
        ids = self.shards.row(index, ("input_ids",))["input_ids"]
        captions = ids if isinstance(ids, list) else [ids]  # shards of format 1 hold one caption per image
        where = self.shards.location(index)
        for caption in captions:
            check_ids(caption, self.tokenizer.vocab_size, "caption token id", where)
        return [caption.astype(np.int64) for caption in captions]

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        key = self._key(key)
        rng = self.rng(key)
        sample = self.image_sample(key.index, rng)
        caption_index, matched = key.index, 1
        if rng.random() < self.itm_negative_prob:
            other = int(rng.integers(0, len(self) - 1))
            caption_index, matched = other + (other >= key.index), 0
        captions = self.captions(caption_index)
        # one caption per (sample, epoch); a single-caption sample draws nothing, so its stream is unchanged
        ids = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        return {**sample, "input_ids": ids, "itm_labels": torch.tensor(matched), "key": key}

    def collator(self) -> ImageTextCollator:
        return ImageTextCollator(TextCollator(self.tokenizer, self.seed, self.mlm_prob, self.whole_word))


class ImageTextCollator:
    """Stack the image fields; pad and MLM-mask the captions like text-only batches (to the longest caption)."""

    def __init__(self, text: TextCollator):
        self.text = text

    def __call__(self, samples: Sequence[dict[str, Any]]) -> Batch:
        itm_labels = torch.stack([s["itm_labels"] for s in samples])
        return Batch(**image_inputs(samples), **self.text.padded(samples), itm_labels=itm_labels)

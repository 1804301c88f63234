"""Random model inputs for the three batch kinds (tests only)."""

from __future__ import annotations

import torch

from flava_ds.model import FlavaConfig


def make_batches(cfg: FlavaConfig, batch: int = 4, seq_len: int = 9, seed: int = 0) -> dict[str, dict]:
    """image-text (with padding and one ITM negative), image-only and text-only batches."""
    g = torch.Generator().manual_seed(seed)
    P, vocab = cfg.image.num_patches, cfg.text.vocab_size
    ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):  # ragged captions padded with id 0
        attention_mask[row, max(3, seq_len - 2 * row) :] = 0
    ids = ids * attention_mask
    masked_pos = (torch.rand(batch, seq_len, generator=g) < 0.3) & attention_mask.bool()
    masked_pos[:, 1] = True
    ids_masked = ids.masked_fill(masked_pos, 3)
    mlm_labels = ids.masked_fill(~masked_pos, -100)
    size = cfg.image.image_size
    pixels = torch.randn(batch, cfg.image.num_channels, size, size, generator=g)
    bool_masked_pos = torch.rand(batch, P, generator=g) < 0.4
    bool_masked_pos[:, 0] = True
    mim_labels = torch.randint(0, cfg.image.codebook_vocab_size, (batch, P), generator=g)
    itm_labels = torch.ones(batch, dtype=torch.long)
    itm_labels[batch // 2] = 0
    image = {"pixel_values": pixels, "bool_masked_pos": bool_masked_pos, "mim_labels": mim_labels}
    text = {
        "input_ids": ids,
        "input_ids_masked": ids_masked,
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
    }
    return {"image_text": {**image, **text, "itm_labels": itm_labels}, "image": image, "text": text}

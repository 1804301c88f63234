"""The model and global batch shared by the contrastive tests and their torchrun worker."""

from __future__ import annotations

import torch

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from tests.model_inputs import make_batches

GLOBAL_BATCH = 8


def contrastive_model(global_backprop: bool = True) -> FlavaForPreTraining:
    """Contrastive loss only: a per-rank mean of it averages to exactly the global mean."""
    torch.manual_seed(0)
    config = FlavaConfig.preset(
        "tiny", itm_weight=0.0, mmm_image_weight=0.0, mmm_text_weight=0.0, global_backprop_contrastive=global_backprop
    )
    model = FlavaForPreTraining(config)
    with torch.no_grad():  # embeddings that differ per sample, so every pair matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def global_batch(config: FlavaConfig) -> dict[str, torch.Tensor]:
    batch = make_batches(config, batch=GLOBAL_BATCH, seq_len=7, seed=9)["image_text"]
    return {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}

"""Model FLOPs counted analytically from the config and the batch's real shapes (for TFLOP/s and MFU).

Counts matrix multiplies only (2 FLOPs per multiply-add), forward x 3 for forward + backward, as
Megatron-LM and PaLM's MFU do; activation checkpointing recomputation is not model FLOPs.
"""

from __future__ import annotations

import torch

from flava_ds.model.config import EncoderConfig, FlavaConfig

# Dense bf16 peak TFLOP/s per device (no sparsity), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A6000": 155.0,
    "V100": 125.0,
}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def _encoder(cfg: EncoderConfig, batch: int, tokens: int, last_queries: int | None = None) -> float:
    """`last_queries`: positions (summed over the batch) whose last-layer output a loss reads; the last layer
    needs keys and values of every position but queries, projection and MLP only for those."""
    H, M = cfg.hidden_size, cfg.mlp_size

    def layer(queries: int) -> float:
        return 2 * batch * tokens * 2 * H * H + 2 * queries * (2 * H * H + 2 * H * M) + 4 * queries * tokens * H

    last = batch * tokens if last_queries is None else last_queries
    return (cfg.num_layers - 1) * layer(batch * tokens) + layer(last)


def _head(hidden: int, vocab: int, positions: int) -> float:
    return 2 * positions * (hidden * hidden + hidden * vocab)


def batch_flops(cfg: FlavaConfig, task: str, batch: dict[str, torch.Tensor]) -> float:
    """Forward + backward model FLOPs of one micro-batch of kind `task` ('image_text', 'image', 'text')."""
    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    fwd = 0.0
    if "pixel_values" in batch:
        B, P = batch["pixel_values"].shape[0], img.num_patches
        patches = 2 * B * P * img.num_channels * img.patch_size**2 * img.hidden_size
        masked = int(batch["bool_masked_pos"].sum())
    if "input_ids" in batch:
        B, L = batch["input_ids"].shape
        masked_text = int((batch["mlm_labels"] != -100).sum())
    if task == "image":
        fwd = patches + _encoder(img, B, P + 1, masked) + _head(img.hidden_size, img.codebook_vocab_size, masked)
    elif task == "text":
        fwd = _encoder(txt, B, L, masked_text) + _head(txt.hidden_size, txt.vocab_size, masked_text)
    else:
        # unmasked views (the contrastive loss reads CLS) and masked views (all positions feed fusion)
        fwd = 2 * patches + _encoder(img, B, P + 1, B) + _encoder(img, B, P + 1)
        fwd += _encoder(txt, B, L, B) + _encoder(txt, B, L)
        fwd += 2 * B * ((P + 1) * img.hidden_size + L * txt.hidden_size) * mm.hidden_size  # to-mm projections
        matched = batch["itm_labels"].bool() if "itm_labels" in batch else torch.ones(B, dtype=torch.bool)
        matched |= ~matched.any()  # MMM reads matched pairs only (all if none matched)
        mmm_image = int(batch["bool_masked_pos"][matched].sum())
        mmm_text = int((batch["mlm_labels"][matched] != -100).sum())
        fwd += _encoder(mm, B, 1 + (P + 1) + L, B + mmm_image + mmm_text)  # CLS_M (ITM) + MMM positions
        fwd += _head(mm.hidden_size, img.codebook_vocab_size, mmm_image) + _head(
            mm.hidden_size, txt.vocab_size, mmm_text
        )
        fwd += 2 * B * (img.hidden_size + txt.hidden_size) * cfg.projection_dim + 2 * B * mm.hidden_size**2
    return 3 * fwd


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the encoders see: real text tokens plus image patches (+ CLS)."""
    tokens = 0
    if "attention_mask" in batch:
        tokens += int(batch["attention_mask"].sum())
    if "bool_masked_pos" in batch:
        tokens += batch["bool_masked_pos"].numel() + batch["bool_masked_pos"].shape[0]
    return tokens

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


def _encoder(cfg: EncoderConfig, lengths: torch.Tensor, last_queries: torch.Tensor | None = None) -> float:
    """`lengths` (B,): each row's real tokens (padding is never computed); `last_queries` (B,): the positions
    whose last-layer output a loss reads. The last layer needs keys and values of every real token, but queries,
    projection and MLP only for those."""
    H, M = cfg.hidden_size, cfg.mlp_size
    lengths = lengths.double()
    tokens = float(lengths.sum())

    def layer(queries: torch.Tensor) -> float:
        attention = 4 * H * float((queries * lengths).sum())  # scores and weighted values over the row's keys
        return 2 * tokens * 2 * H * H + 2 * float(queries.sum()) * (2 * H * H + 2 * H * M) + attention

    last = lengths if last_queries is None else last_queries.double()
    return (cfg.num_layers - 1) * layer(lengths) + layer(last)


def _head(hidden: int, vocab: int, positions: torch.Tensor) -> float:
    return 2 * float(positions.sum()) * (hidden * hidden + hidden * vocab)


def batch_flops(cfg: FlavaConfig, task: str, batch: dict[str, torch.Tensor]) -> float:
    """Forward + backward model FLOPs of one micro-batch of kind `task` ('image_text', 'image', 'text')."""
    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    fwd = 0.0
    if "pixel_values" in batch:
        B, P = batch["pixel_values"].shape[0], img.num_patches
        patches = 2 * B * P * img.num_channels * img.patch_size**2 * img.hidden_size
        image_lengths = torch.full((B,), P + 1)
        masked = batch["bool_masked_pos"].sum(1)
    if "input_ids" in batch:
        B, L = batch["input_ids"].shape
        text_lengths = batch["attention_mask"].sum(1) if "attention_mask" in batch else torch.full((B,), L)
        masked_text = (batch["mlm_labels"] != -100).sum(1)
    if task == "image":
        fwd = patches + _encoder(img, image_lengths, masked) + _head(img.hidden_size, img.codebook_vocab_size, masked)
    elif task == "text":
        fwd = _encoder(txt, text_lengths, masked_text) + _head(txt.hidden_size, txt.vocab_size, masked_text)
    else:
        cls = torch.ones(B)
        # unmasked views (the contrastive loss reads CLS) and masked views (all positions feed fusion)
        fwd = 2 * patches + _encoder(img, image_lengths, cls) + _encoder(img, image_lengths)
        fwd += _encoder(txt, text_lengths, cls) + _encoder(txt, text_lengths)
        real_text = float(text_lengths.sum())
        fwd += 2 * (B * (P + 1) * img.hidden_size + real_text * txt.hidden_size) * mm.hidden_size  # to-mm
        matched = batch["itm_labels"].bool() if "itm_labels" in batch else torch.ones(B, dtype=torch.bool)
        matched |= ~matched.any()  # MMM reads matched pairs only (all if none matched)
        mmm_image, mmm_text = masked * matched, masked_text * matched
        fwd += _encoder(mm, 2 + P + text_lengths, cls + mmm_image + mmm_text)  # CLS_M (ITM) + MMM positions
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

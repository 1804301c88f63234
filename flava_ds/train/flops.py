"""Model FLOPs counted analytically from the config and the batch's real shapes (for TFLOP/s and MFU).

Counts matrix multiplies only (2 FLOPs per multiply-add), forward x 3 for forward + backward, as
Megatron-LM and PaLM's MFU do (x 2 for the patch embedding, whose input needs no gradient); activation
checkpointing recomputation is not model FLOPs, nor is the contrastive cache's forward without gradient
under accumulation (it recomputes embeddings the step's micro-steps compute again). Only what the model runs
is counted: the passes and heads of its `ForwardPlan` for the config's loss weights and the batch's inputs.
"""

from __future__ import annotations

import torch

from flava_ds.batch import Batch
from flava_ds.model.config import EncoderConfig, FlavaConfig
from flava_ds.model.objectives import ForwardPlan, matched_rows, mim_targets
from flava_ds.shard_format import IGNORE_INDEX

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


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B,) on the CPU, where the counting happens whatever device the batch is on."""
    return mask.sum(1).cpu()


def batch_flops(cfg: FlavaConfig, b: Batch) -> float:
    """Forward + backward model FLOPs of one micro-batch: the passes and heads the model's own `ForwardPlan` runs
    for this config and batch, so a loss of weight 0 (FLAVA_C's masked views and fusion) is not counted."""
    plan = ForwardPlan.of(cfg, b)
    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    if b.pixel_values is not None:
        B, P = b.pixel_values.shape[0], img.num_patches
        # the patch embedding runs forward and weight gradient only (pixels need none): 2/3 of the final x 3
        patches = 2 / 3 * 2 * B * P * img.num_channels * img.patch_size**2 * img.hidden_size
        image_lengths = torch.full((B,), P + 1)
        if b.mim_labels is not None:
            masked_patches = _row_counts(mim_targets(b.mim_labels, b.bool_masked_pos).ne(IGNORE_INDEX))
    if b.has_text:
        B, L = b.text_ids.shape
        text_lengths = _row_counts(b.attention_mask) if b.attention_mask is not None else torch.full((B,), L)
        if b.mlm_labels is not None:
            masked_text = _row_counts(b.mlm_labels.ne(IGNORE_INDEX))

    def image(queries: torch.Tensor | None = None) -> float:
        return patches + _encoder(img, image_lengths, queries)

    if plan.kind == "image":
        if "mim" not in plan.heads:
            return 3 * image()
        return 3 * (image(masked_patches) + _head(img.hidden_size, img.codebook_vocab_size, masked_patches))
    if plan.kind == "text":
        if "mlm" not in plan.heads:
            return 3 * _encoder(txt, text_lengths)
        return 3 * (_encoder(txt, text_lengths, masked_text) + _head(txt.hidden_size, txt.vocab_size, masked_text))

    fwd, cls = 0.0, torch.ones(B)
    if plan.contrastive:  # unmasked views (CLS only unless fusion shares them) and the projections
        fwd += image(None if plan.shared_image else cls)
        fwd += _encoder(txt, text_lengths, None if plan.shared_text else cls)
        fwd += 2 * B * (img.hidden_size + txt.hidden_size) * cfg.projection_dim
    if plan.fusion:  # the masked views (unless shared), their projections to fusion, fusion and its heads
        if not plan.shared_image:
            fwd += image()
        if not plan.shared_text:
            fwd += _encoder(txt, text_lengths)
        fwd += 2 * (B * (P + 1) * img.hidden_size + float(text_lengths.sum()) * txt.hidden_size) * mm.hidden_size
        rows = matched_rows(b.itm_labels)
        rows = torch.ones(B) if rows is None else rows.cpu().double()
        mmm_image = masked_patches * rows if "mmm_image" in plan.heads else torch.zeros(B)
        mmm_text = masked_text * rows if "mmm_text" in plan.heads else torch.zeros(B)
        fwd += _encoder(mm, 2 + P + text_lengths, cls + mmm_image + mmm_text)  # CLS_M + the MMM positions
        fwd += _head(mm.hidden_size, img.codebook_vocab_size, mmm_image)
        fwd += _head(mm.hidden_size, txt.vocab_size, mmm_text)
        if "itm" in plan.heads:
            fwd += 2 * B * mm.hidden_size * (mm.hidden_size + 2)
    return 3 * fwd


def batch_tokens(b: Batch) -> int:
    """Tokens the encoders see: real text tokens plus image patches (+ CLS)."""
    tokens = 0
    if b.attention_mask is not None:
        tokens += int(b.attention_mask.sum())
    if b.bool_masked_pos is not None:
        tokens += b.bool_masked_pos.numel() + b.bool_masked_pos.shape[0]
    return tokens

"""The one place where the attention implementation is chosen (`FlavaConfig.attn_impl`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, impl: str
) -> torch.Tensor:
    """Bidirectional attention. q, k, v: (B, heads, N, head_dim); key_padding_mask: (B, N) bool, True = real."""
    if impl == "sdpa":
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "eager":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, N, N)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1) @ v
    if impl == "triton":
        from flava_ds.kernels import flash_attention

        return flash_attention(q, k, v, key_padding_mask=key_padding_mask)
    raise ValueError(f"unknown attention implementation {impl!r}")

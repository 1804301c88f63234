"""Pre-norm transformer stack shared by the image, text and multimodal encoders (ViT/BERT block layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flava_ds.model.attention import attention
from flava_ds.model.config import EncoderConfig
from flava_ds.parallel.layers import column_parallel_linear, per_rank, row_parallel_linear


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig, attn_impl: str):
        super().__init__()
        self.num_heads = per_rank(cfg.num_heads)  # this tensor-parallel rank's heads
        self.head_dim, self.attn_impl = cfg.head_dim, attn_impl
        # rows [q; k; v]; under tensor parallelism each rank holds [q_r; k_r; v_r] for its heads (stride 3)
        self.qkv = column_parallel_linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias, stride=3)
        self.proj = row_parallel_linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (
            self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, h, N, d)
        out = attention(q, k, v, key_padding_mask, self.attn_impl)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, attn_impl)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_in = column_parallel_linear(cfg.hidden_size, cfg.mlp_size)
        self.mlp_out = row_parallel_linear(cfg.mlp_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn(self.norm1(x), key_padding_mask) + x
        return self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)))) + x


class Encoder(nn.Module):
    """A stack of blocks; returns the last hidden state BEFORE the final LayerNorm (FLAVA fuses those)."""

    def __init__(self, cfg: EncoderConfig, attn_impl: str, activation_checkpointing: bool, compile: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, attn_impl) for _ in range(cfg.num_layers))
        if compile:  # in place: parameter names and state dicts stay those of the eager blocks
            for layer in self.layers:
                layer.compile()
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        return x

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

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, query_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, N, H) -> (B, N, H), or (B, Q, H) for the positions `query_index` (B, Q) only (keys: all N)."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if query_index is not None:
            q = q.gather(2, query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, h, Q, d)
        out = attention(q, k, v, key_padding_mask, self.attn_impl)  # (B, h, Q, d)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], -1))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, attn_impl)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_in = column_parallel_linear(cfg.hidden_size, cfg.mlp_size)
        self.mlp_out = row_parallel_linear(cfg.mlp_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, query_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        residual = x if query_index is None else gather_positions(x, query_index)
        x = self.attn(self.norm1(x), key_padding_mask, query_index) + residual
        return self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)))) + x


class Encoder(nn.Module):
    """A stack of blocks; returns the last hidden state BEFORE the final LayerNorm (FLAVA fuses those).

    With `query_index` (B, Q) the last block computes only those positions' outputs, (B, Q, H): a loss that reads
    a few positions (CLS for contrastive/ITM, masked ones for MIM/MLM/MMM) skips most of that block, whose keys
    and values still come from every position. Earlier blocks always compute every position.
    """

    def __init__(self, cfg: EncoderConfig, attn_impl: str, activation_checkpointing: bool, compile: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, attn_impl) for _ in range(cfg.num_layers))
        if compile:  # in place: parameter names and state dicts stay those of the eager blocks
            for layer in self.layers:
                layer.compile()
        self.activation_checkpointing = activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            args = (x, key_padding_mask, query_index if i == last else None)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) at positions index (B, Q) -> (B, Q, ...)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def positions_first(wanted: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> index (B, Q): each row's wanted positions in order, then its other positions as filler,
    Q = the most wanted in any row (at least 1). Filler outputs are computed but never read."""
    count = max(int(wanted.sum(1).max()), 1)
    return torch.argsort((~wanted).to(torch.uint8), dim=1, stable=True)[:, :count]

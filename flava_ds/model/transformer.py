"""Pre-norm transformer stack shared by the image, text and multimodal encoders (ViT/BERT block layout)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """x (B, N, H) -> (B, N, H), or (B, Q, H) for the positions `query_index` (B, Q) only (keys: all N).
        With `packing`, x is (1, T, H), the real tokens only, and so is the output unless `query_index` is given."""
        packing, query_index = layout.packing, layout.query_index
        qkv = self.qkv(x)  # (B, N, 3H), or (1, T, 3H) packed
        if packing is not None:  # attention itself runs padded: each row's keys are its own tokens
            qkv = packing.unpack(qkv)
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if query_index is not None:
            q = q.gather(2, query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, h, Q, d)
        out = attention(q, k, v, layout.key_padding_mask, self.attn_impl)  # (B, h, Q, d)
        out = out.transpose(1, 2).reshape(B, q.shape[2], -1)  # (B, Q, H)
        if packing is not None and query_index is None:
            out = packing.pack(out)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, attn_impl)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_in = column_parallel_linear(cfg.hidden_size, cfg.mlp_size)
        self.mlp_out = row_parallel_linear(cfg.mlp_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        packing, query_index = layout.packing, layout.query_index
        residual = x
        if query_index is not None:
            residual = gather_positions(x if packing is None else packing.unpack(x), query_index)
        x = self.attn(self.norm1(x), layout) + residual
        return self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)))) + x


class Encoder(nn.Module):
    """A stack of blocks; returns the last hidden state BEFORE the final LayerNorm (FLAVA fuses those).

    With `query_index` (B, Q) the last block computes only those positions' outputs, (B, Q, H): a loss that reads
    a few positions (CLS for contrastive/ITM, masked ones for MIM/MLM/MMM) skips most of that block, whose keys
    and values still come from every position. Earlier blocks compute every position.

    With padding in `key_padding_mask`, the projections, MLPs and norms run on the real tokens only (`Packing`):
    a padded position never influences a real one (its key is masked), so skipping it changes no real output.
    Padded positions of the result are zeros.
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
        packing = Packing.of(key_padding_mask)
        if packing is not None:
            x = packing.pack(x)  # (1, T, H)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layout = Layout(key_padding_mask, packing, query_index if i == last else None)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
        if packing is not None and query_index is None:
            x = packing.unpack(x)
        return x


@dataclass
class Packing:
    """Where the real tokens of a padded batch sit, so per-token work (projections, MLP, norms) skips padding.

    Packed tensors are (1, T, ...), T real tokens: 3-D like the padded (B, N, ...) ones, as megatron-core's
    tensor-parallel linear layers expect."""

    index: torch.Tensor  # (T,) positions of the real tokens in the flattened (B * N) batch
    batch: int
    length: int

    @classmethod
    def of(cls, key_padding_mask: torch.Tensor | None) -> Packing | None:
        """None when nothing is padded (packing would only add copies)."""
        if key_padding_mask is None:
            return None
        index = key_padding_mask.flatten().nonzero().squeeze(1)  # one host sync: T decides the shapes
        return None if index.numel() == key_padding_mask.numel() else cls(index, *key_padding_mask.shape)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (1, T, ...)."""
        return x.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) -> (B, N, ...), zeros at padded positions."""
        flat = x.new_zeros(self.batch * self.length, *x.shape[2:]).index_copy(0, self.index, x[0])
        return flat.view(self.batch, self.length, *x.shape[2:])


@dataclass(frozen=True)
class Layout:
    """What a block needs besides its input: the key padding mask, the `Packing` of the real tokens (None when
    nothing is padded) and the positions (B, Q) whose outputs are wanted (None: every position)."""

    key_padding_mask: torch.Tensor | None
    packing: Packing | None
    query_index: torch.Tensor | None


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) at positions index (B, Q) -> (B, Q, ...)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def positions_first(wanted: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> index (B, Q): each row's wanted positions in order, then its other positions as filler,
    Q = the most wanted in any row (at least 1). Filler outputs are computed but never read."""
    count = max(int(wanted.sum(1).max()), 1)
    return torch.argsort((~wanted).to(torch.uint8), dim=1, stable=True)[:, :count]

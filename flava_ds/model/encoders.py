"""The three FLAVA encoders: ViT image encoder, BERT-style text encoder, and the multimodal fusion encoder.

Each returns `(hidden, normed)`: the last hidden state before the final LayerNorm (what the
multimodal encoder consumes) and after it (what the unimodal heads and contrastive projections use).
`query_index` (B, Q) limits both to those positions (see `Encoder`): the losses read few of them.
The poolers exist only so `transformers` checkpoints round-trip; no pretraining loss uses them, so
they are frozen and never run.
"""

from __future__ import annotations

import torch
from torch import nn

from flava_ds.model.config import EncoderConfig, FlavaConfig
from flava_ds.model.transformer import Encoder


class _EncoderStack(nn.Module):
    def _add_stack(self, c: EncoderConfig, config: FlavaConfig) -> None:
        """The transformer blocks, final LayerNorm and frozen pooler; added after the embeddings, which keeps the
        parameter order (and so the draws for a seed) and the state-dict keys of each encoder."""
        self.encoder = Encoder(c, config.attn_impl, config.activation_checkpointing, config.compile)
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.pooler.requires_grad_(False)


class ImageEncoder(_EncoderStack):
    def __init__(self, config: FlavaConfig):
        super().__init__()
        c = config.image
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.hidden_size))
        self._add_stack(c, config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, P, H)
        if bool_masked_pos is not None:  # masked patches take the learned mask token, before CLS/positions
            x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+P, H)
        hidden = self.encoder(x, None, query_index)  # (B, 1+P or Q, H)
        return hidden, self.final_norm(hidden)


class TextEncoder(_EncoderStack):
    def __init__(self, config: FlavaConfig):
        super().__init__()
        c = config.text
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self._add_stack(c, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        query_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # every weight through its module's call, so ZeRO-3 gathers it whichever method runs the encoder
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        segment = self.token_type_embeddings(torch.zeros_like(positions[:1]))  # (1, H): single segment, type 0
        x = self.word_embeddings(input_ids) + segment
        x = self.embed_norm(x + self.position_embeddings(positions))  # (B, L, H)
        hidden = self.encoder(x, key_padding_mask, query_index)  # (B, L or Q, H)
        return hidden, self.final_norm(hidden)


class MultimodalEncoder(_EncoderStack):
    def __init__(self, config: FlavaConfig):
        super().__init__()
        c = config.multimodal
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self._add_stack(c, config)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        text_padding_mask: torch.Tensor | None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image (B, 1+P, H), text (B, L, H) already projected -> (B, 1 + 1+P + L, H) after the final norm
        (or (B, Q, H) at `query_index`)."""
        B = image.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), image, text], dim=1)
        mask = None
        if text_padding_mask is not None:  # text padding stays masked in fusion (as in transformers)
            image_keep = text_padding_mask.new_ones(B, 1 + image.shape[1])
            mask = torch.cat([image_keep, text_padding_mask], dim=1)
        return self.final_norm(self.encoder(x, mask, query_index))

"""Which of FLAVA's objectives a batch trains, and the targets each one averages over (docs/DESIGN.md §3).

`ForwardPlan` decides the passes and heads one forward runs from the config's loss weights and the batch; the
model follows it and `flava_ds.train.flops` counts it. `target_counts` gives what each loss averages over, so a
trainer can normalise every term by the global batch of a step (`FlavaForPreTraining.loss_normalizers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flava_ds.batch import Batch
from flava_ds.model.config import FlavaConfig
from flava_ds.shard_format import IGNORE_INDEX

LOSS_NAMES = ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text")
# Per head: the batch kind it runs in and the input it reads (None: ITM's logits need no labels).
_HEAD_INPUTS = {
    "mim": ("image", "mim_labels"),
    "mlm": ("text", "mlm_labels"),
    "itm": ("image_text", None),
    "global_contrastive": ("image_text", "input_ids"),
    "mmm_image": ("image_text", "mim_labels"),
    "mmm_text": ("image_text", "mlm_labels"),
}
FUSION_HEADS = frozenset({"itm", "mmm_image", "mmm_text"})


@dataclass(frozen=True)
class ForwardPlan:
    """Which passes and heads one forward runs. A head runs for a loss of weight > 0 whose input is given, a pass
    only when a running head reads it (FLAVA_C, contrastive only, runs no masked view and no fusion), so the model
    FLOPs behind MFU are those of the work that runs."""

    kind: str  # the batch's kind: 'image_text', 'image' or 'text'
    heads: frozenset[str]  # the LOSS_NAMES whose heads run; 'global_contrastive': the unmasked views' projections
    shared_image: bool  # image-text: one unmasked image pass feeds contrastive and fusion (no mask was given)
    shared_text: bool  # image-text: one text pass feeds both (no masked ids were given)

    @classmethod
    def of(cls, config: FlavaConfig, b: Batch) -> ForwardPlan:
        kind = b.kind
        heads = frozenset(
            name
            for name, (head_kind, needs) in _HEAD_INPUTS.items()
            if head_kind == kind
            and getattr(config, f"{name}_weight") > 0
            and (needs is None or getattr(b, needs) is not None)
        )
        both = "global_contrastive" in heads and not heads.isdisjoint(FUSION_HEADS)
        return cls(kind, heads, both and b.bool_masked_pos is None, both and b.text_ids is b.input_ids)

    @property
    def contrastive(self) -> bool:
        """The unmasked views run; the contrastive loss reads their CLS only (all positions when shared)."""
        return "global_contrastive" in self.heads

    @property
    def fusion(self) -> bool:
        """The masked views (or the shared unmasked ones) and the multimodal encoder run."""
        return not self.heads.isdisjoint(FUSION_HEADS)


def matched_rows(itm_labels: torch.Tensor | None, fallback: bool = True) -> torch.Tensor | None:
    """The rows (B,) whose pair is matched, which MMM and the contrastive loss read; with `fallback` all rows
    when none is (as `transformers`)."""
    if itm_labels is None:
        return None
    matched = itm_labels.ne(0)
    return matched | ~matched.any() if fallback else matched


def mim_targets(mim_labels: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """Codebook ids at masked patches, ignore index elsewhere (never modifies the caller's tensor)."""
    return mim_labels.masked_fill(~bool_masked_pos.bool(), IGNORE_INDEX)


def rows_only(targets: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Targets of the rows outside `row_mask` (B,) set to the ignore index."""
    return targets if row_mask is None else targets.masked_fill(~row_mask[:, None], IGNORE_INDEX)


def target_counts(config: FlavaConfig, b: Batch) -> dict[str, torch.Tensor]:
    """How many targets each loss of this batch averages over, as 0-dim tensors keyed by LOSS_NAMES: masked
    patches / tokens for MIM, MLM and MMM (MMM on matched pairs only), labelled pairs for ITM, query rows for
    the contrastive loss."""
    heads = ForwardPlan.of(config, b).heads
    rows = matched_rows(b.itm_labels, fallback=False)
    targets = {
        "mim": lambda: mim_targets(b.mim_labels, b.bool_masked_pos),
        "mlm": lambda: b.mlm_labels,
        "mmm_image": lambda: rows_only(mim_targets(b.mim_labels, b.bool_masked_pos), rows),
        "mmm_text": lambda: rows_only(b.mlm_labels, rows),
    }
    counts = {name: get().ne(IGNORE_INDEX).sum() for name, get in targets.items() if name in heads}
    if "itm" in heads and b.itm_labels is not None:
        counts["itm"] = torch.tensor(b.itm_labels.numel())
    if "global_contrastive" in heads:
        counts["global_contrastive"] = torch.tensor(b.input_ids.shape[0]) if rows is None else rows.sum()
    return counts


def check_inputs(config: FlavaConfig, b: Batch) -> None:
    """Missing or wrongly shaped inputs raise ValueError naming the input and the expected shape."""
    img = config.image
    if b.pixel_values is None and not b.has_text:
        raise ValueError("FlavaForPreTraining.forward: pass pixel_values (B, C, H, W) and/or input_ids (B, L)")
    B = (b.pixel_values if b.pixel_values is not None else b.text_ids).shape[0]  # B from images, else text
    P = img.num_patches
    if b.pixel_values is not None:
        _expect("pixel_values", b.pixel_values, (B, img.num_channels, img.image_size, img.image_size))
        _expect("bool_masked_pos", b.bool_masked_pos, (B, P))
        _expect("mim_labels", b.mim_labels, (B, P))
        if b.mim_labels is not None and b.bool_masked_pos is None:
            raise ValueError(f"mim_labels given without bool_masked_pos: pass bool_masked_pos of shape ({B}, {P})")
    if b.has_text:
        ref = b.input_ids if b.input_ids is not None else b.input_ids_masked
        if ref.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq_len), got {tuple(ref.shape)}")
        L, limit = ref.shape[1], config.text.max_position_embeddings
        if L > limit:
            raise ValueError(f"input_ids: seq_len {L} exceeds text.max_position_embeddings={limit}")
        for name in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels"):
            _expect(name, getattr(b, name), (B, L))
    else:
        for name in ("attention_mask", "mlm_labels", "itm_labels"):
            if getattr(b, name) is not None:
                raise ValueError(f"{name} given without input_ids: pass input_ids of shape (batch, seq_len)")
    _expect("itm_labels", b.itm_labels, (B,))
    if b.kind == "image_text" and config.global_contrastive_weight > 0 and b.input_ids is None:
        raise ValueError(f"image-text batch: the contrastive loss needs the unmasked input_ids of shape ({B}, L)")


def _expect(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")

"""Global contrastive loss (FLAVA §3.2): embeddings gathered over data-parallel ranks WITH gradient.

Each rank scores its local rows against the global columns; labels are offset by the rank. With
`global_backprop=False` the gather carries no gradient (CLIP-style local gradients, the paper's ablation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flava_ds.parallel.state import data_parallel_group


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows. (torch.distributed.nn's version
    emulates that on gloo with scatters that mis-address the ranks of a subgroup, e.g. the DP group under TP.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


def _gather(x: torch.Tensor, group: dist.ProcessGroup | None, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return _AllGather.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    parts[dist.get_rank(group)] = x  # keep the local block in the graph
    return torch.cat(parts, dim=0)


class GlobalContrastiveLoss(nn.Module):
    def __init__(self, global_backprop: bool = True, logit_scale_max: float = 4.605170185988092):
        super().__init__()
        self.global_backprop = global_backprop
        self.logit_scale_max = logit_scale_max

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        row_mask: torch.Tensor | None = None,
        normalizer: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image_emb, text_emb: (B, D) L2-normalised; row_mask (B,) bool keeps matched pairs as queries;
        `normalizer` replaces the local query count as the divisor of the summed row losses (a global mean).

        Returns (loss, logits_per_image (B', W*B), logits_per_text (B', W*B)).
        """
        B = image_emb.shape[0]
        group = data_parallel_group()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            all_image = _gather(image_emb, group, self.global_backprop)
            all_text = _gather(text_emb, group, self.global_backprop)
            offset = dist.get_rank(group) * B
        else:
            all_image, all_text, offset = image_emb, text_emb, 0
        scale = logit_scale.clamp(0, self.logit_scale_max).exp()
        logits_per_image = (image_emb @ all_text.t()) * scale  # (B, W*B)
        logits_per_text = (text_emb @ all_image.t()) * scale
        labels = offset + torch.arange(B, device=image_emb.device)
        if row_mask is not None:
            logits_per_image, logits_per_text, labels = (
                logits_per_image[row_mask],
                logits_per_text[row_mask],
                labels[row_mask],
            )
        reduction = "mean" if normalizer is None else "sum"
        loss = (
            F.cross_entropy(logits_per_image, labels, reduction=reduction)
            + F.cross_entropy(logits_per_text, labels, reduction=reduction)
        ) / 2
        if normalizer is not None:
            loss = loss / normalizer
        return loss, logits_per_image, logits_per_text

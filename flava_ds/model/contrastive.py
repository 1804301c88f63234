"""Global contrastive loss (FLAVA §3.2): embeddings gathered over data-parallel ranks WITH gradient.

Each rank scores its local rows against the global columns; labels are offset by the rank. With
`global_backprop=False` the gather carries no gradient (CLIP-style local gradients, the paper's ablation).

Under gradient accumulation a micro-batch alone would see only its own columns (B x W negatives instead of the
global batch's). `ContrastiveCache` (GradCache, OpenCLIP's `--accum-freq`) holds the step's embeddings of every
micro-batch on every rank, computed without gradient before the micro-steps. Micro-step m then scores all of this
rank's rows against all global columns, with micro-batch m's block live (recomputed with gradient, gathered with
gradient over the ranks) and the rest cached: its backward gives micro-batch m's embeddings exactly their gradient
under the whole global batch's loss, so the accumulated update equals one pass over the global batch, while
activations stay those of one micro-batch. The loss value counts micro-batch m's rows only (the cached rows enter
with their value subtracted), so the micro-steps' losses still add up to the step's loss; the logit scale gets its
gradient at micro-step 0 only, where it is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return _AllGather.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    parts[dist.get_rank(group)] = x  # keep the local block in the graph
    return torch.cat(parts, dim=0)


def _gather_blocks(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(n, D) on every rank -> (W, n, D), without gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(data_parallel_group()) > 1


@dataclass
class ContrastiveCache:
    """One optimizer step's contrastive embeddings, over all A micro-batches of B rows on all W ranks.

    image, text: (W, A, B, D) global columns, no gradient; row_mask: (A, B) this rank's query rows (matched
    pairs); rank: this rank's data-parallel index; micro: the micro-batch whose block is live (`at`)."""

    image: torch.Tensor
    text: torch.Tensor
    row_mask: torch.Tensor
    rank: int
    micro: int = 0

    @classmethod
    def gather(cls, image: list[torch.Tensor], text: list[torch.Tensor], row_mask: list[torch.Tensor]):
        """From this rank's per-micro-batch embeddings (A tensors of (B, D), computed without gradient) and
        query-row masks (A tensors of (B,)): all-gathers the columns over the data-parallel group."""
        image_local, text_local = torch.stack(image).detach(), torch.stack(text).detach()  # (A, B, D)
        if _distributed():
            group = data_parallel_group()
            both = _gather_blocks(torch.cat([image_local, text_local], dim=-1), group)  # (W, A, B, 2D)
            image_all, text_all = both.split(image_local.shape[-1], dim=-1)
            rank = dist.get_rank(group)
        else:
            image_all, text_all, rank = image_local[None], text_local[None], 0
        return cls(image_all, text_all, torch.stack(row_mask), rank)

    def at(self, micro: int) -> ContrastiveCache:
        """The cache as seen by micro-step `micro` (whose block is recomputed with gradient)."""
        return ContrastiveCache(self.image, self.text, self.row_mask, self.rank, micro)

    def _with_live(self, cached: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's rows (A*B, D), all columns (W*A*B, D)) with micro-batch `micro`'s block replaced by the
        live embeddings `live` (W, B, D) of every rank."""
        m = self.micro
        columns = torch.cat([cached[:, :m], live[:, None], cached[:, m + 1 :]], dim=1)  # (W, A, B, D)
        return columns[self.rank].flatten(0, 1), columns.flatten(0, 2)


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
        cache: ContrastiveCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image_emb, text_emb: (B, D) L2-normalised; row_mask (B,) bool keeps matched pairs as queries;
        `normalizer` replaces the local query count as the divisor of the summed row losses (a global mean);
        `cache` (needs `normalizer`): score against the whole step's columns, see `ContrastiveCache`.

        Returns (loss, logits_per_image (B', W*B), logits_per_text (B', W*B)) (W*A*B columns with a cache).
        """
        if cache is not None:
            return self._cached(image_emb, text_emb, logit_scale, normalizer, cache)
        B = image_emb.shape[0]
        group = data_parallel_group()
        if _distributed():
            all_image = all_gather_rows(image_emb, group, self.global_backprop)
            all_text = all_gather_rows(text_emb, group, self.global_backprop)
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

    def _cached(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        normalizer: float | None,
        cache: ContrastiveCache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if normalizer is None:
            raise ValueError("a ContrastiveCache needs the global normalizer (the step's query count)")
        if _distributed():
            group = data_parallel_group()
            live_image = all_gather_rows(image_emb, group, self.global_backprop).unflatten(0, (-1, image_emb.shape[0]))
            live_text = all_gather_rows(text_emb, group, self.global_backprop).unflatten(0, (-1, text_emb.shape[0]))
        else:
            live_image, live_text = image_emb[None], text_emb[None]  # (W, B, D)
        rows_image, columns_image = cache._with_live(cache.image, live_image)
        rows_text, columns_text = cache._with_live(cache.text, live_text)
        if cache.micro > 0:  # its gradient over the whole step comes from micro-step 0
            logit_scale = logit_scale.detach()
        scale = logit_scale.clamp(0, self.logit_scale_max).exp()
        A, B = cache.row_mask.shape
        queries = cache.row_mask.flatten()  # (A*B,)
        labels = (cache.rank * A * B + torch.arange(A * B, device=image_emb.device))[queries]
        logits_per_image = (rows_image[queries] @ columns_text.t()) * scale  # (queries, W*A*B)
        logits_per_text = (rows_text[queries] @ columns_image.t()) * scale
        per_row = (
            F.cross_entropy(logits_per_image, labels, reduction="none")
            + F.cross_entropy(logits_per_text, labels, reduction="none")
        ) / 2
        live = torch.zeros(A, B, dtype=torch.bool, device=queries.device)
        live[cache.micro] = True
        live = live.flatten()[queries]
        # value: the live rows' losses; gradient: every row's (the cached rows reach the live columns)
        loss = (per_row.sum() - per_row[~live].sum().detach()) / normalizer
        return loss, logits_per_image[live], logits_per_text[live]

"""Linear layers and the loss the model uses, whatever the tensor-parallel size T.

At T = 1 the factories return plain `nn.Linear` (megatron-core is not even imported); at T > 1 megatron-core's
ColumnParallelLinear / RowParallelLinear (`flava_ds.parallel.megatron_layers`). Both have parameters `weight`
(out, in) and `bias` and are called as `y = layer(x)`, so the model code is the same at any T.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flava_ds.parallel.sharding import full_shape, shard_like
from flava_ds.parallel.state import tensor_parallel_group, tensor_parallel_size

VOCAB_PADDING = 128  # megatron's make_vocab_size_divisible_by: the padded vocabulary is a multiple of 128 * T


def per_rank(size: int) -> int:
    """This rank's part of a dimension split over the TP ranks (heads, features)."""
    world = tensor_parallel_size()
    if size % world:
        raise ValueError(f"{size} is not divisible by tensor_parallel_size={world}")
    return size // world


def padded_vocab_size(vocab_size: int, world: int) -> int:
    multiple = VOCAB_PADDING * world
    return -(-vocab_size // multiple) * multiple


class TensorParallelLinearMixin:
    """What the megatron-core layers share here: `nn.Linear`'s call, state-dict keys and initialisation.

    megatron returns (output, bias) and adds an empty `_extra_state` key for Transformer Engine; both are hidden.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]

    @torch.no_grad()
    def init_normal_(self, std: float) -> None:
        """N(0, std) weight, zero bias. The full weight is drawn and sliced: the same draws as for the `nn.Linear`
        this layer is at T = 1, so a seed gives the same model at any T."""
        weight = self.weight
        full = torch.empty(full_shape(weight), dtype=weight.dtype, device=weight.device).normal_(0.0, std)
        weight.copy_(shard_like(full, weight))
        if self.bias is not None:
            self.bias.zero_()


def column_parallel_linear(in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
    """Output features split over TP ranks (each rank returns its features); `stride` interleaved blocks per rank
    keep fused projections ([q; k; v] with stride 3) split block by block."""
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    from flava_ds.parallel.megatron_layers import ColumnParallel

    return ColumnParallel(in_features, out_features, bias=bias, stride=stride)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Input features split over TP ranks (the output of a column-parallel layer); output summed, full, replicated."""
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    from flava_ds.parallel.megatron_layers import RowParallel

    return RowParallel(in_features, out_features, bias=bias)


def vocab_parallel_linear(in_features: int, vocab_size: int) -> nn.Module:
    """A decoder over `vocab_size` classes. At T > 1 the vocabulary is padded to a multiple of 128 * T and split;
    each rank returns logits for its classes, padded ones at -inf. Pair with `cross_entropy(vocab_parallel=True)`."""
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, vocab_size)
    from flava_ds.parallel.megatron_layers import VocabParallelDecoder

    return VocabParallelDecoder(in_features, vocab_size)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_parallel: bool, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over rows, their "mean" or "sum" (a global-batch mean divides the sum itself); with
    `vocab_parallel` at T > 1 the classes are split over the TP ranks (megatron-core's
    vocab_parallel_cross_entropy: no rank ever holds the full logits). No ignore index: callers pass only rows
    with a target."""
    if not vocab_parallel or tensor_parallel_size() == 1:
        return F.cross_entropy(logits, labels, reduction=reduction)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron works in place on fp32 logits; the copy keeps the caller's logits intact
    per_row = vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)
    return per_row.sum() if reduction == "sum" else per_row.mean()


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full logits (..., vocab_size) from vocab-parallel ones, for evaluation; no gradient. Collective over TP."""
    world = tensor_parallel_size()
    if world == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.detach().contiguous(), group=tensor_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab_size]

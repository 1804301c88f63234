"""Full (unsharded, unpadded) state dicts from tensor-parallel shards, and back.

A tensor-parallel parameter carries megatron-core's attributes `tensor_model_parallel`, `partition_dim` and
`partition_stride`, plus `unpadded_size` where the split dimension was padded (the vocabulary). With stride s
the full tensor is cut into s * T equal chunks along `partition_dim` and rank r holds chunks r, T + r, 2T + r, ...
(megatron's layout): a fused [q; k; v] projection (s = 3) thus gives each rank [q_r; k_r; v_r], its own heads.
Exports and imports go through the full state dict, so checkpoints do not depend on the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flava_ds.parallel.state import tensor_parallel_group, tensor_parallel_rank, tensor_parallel_size


def shard(full: torch.Tensor, dim: int, stride: int, world: int, rank: int, padded_size: int) -> torch.Tensor:
    """This rank's shard of `full`, zero-padded to `padded_size` along `dim` first."""
    pad = padded_size - full.shape[dim]
    if pad:
        widths = [0, 0] * (full.dim() - 1 - dim) + [0, pad]  # F.pad lists the last dimension first
        full = F.pad(full, widths)
    chunks = full.chunk(stride * world, dim=dim)
    return torch.cat([chunks[j * world + rank] for j in range(stride)], dim=dim)


def merge(shards: list[torch.Tensor], dim: int, stride: int, full_size: int) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's shard (in rank order), padding dropped."""
    pieces = [part.chunk(stride, dim=dim) for part in shards]
    full = torch.cat([pieces[rank][j] for j in range(stride) for rank in range(len(shards))], dim=dim)
    return full.narrow(dim, 0, full_size)


def is_sharded(param: torch.Tensor) -> bool:
    return tensor_parallel_size() > 1 and bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape `param` has at tensor-parallel size 1."""
    if not is_sharded(param):
        return param.shape
    shape = list(param.shape)
    shape[param.partition_dim] = getattr(param, "unpadded_size", shape[param.partition_dim] * tensor_parallel_size())
    return torch.Size(shape)


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor for the (possibly sharded) parameter `param`."""
    if not is_sharded(param):
        return full
    dim, world = param.partition_dim, tensor_parallel_size()
    return shard(full, dim, param.partition_stride, world, tensor_parallel_rank(), param.shape[dim] * world)


def full_state_dict(module: nn.Module, local: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every sharded tensor gathered and unpadded. Collective over the TP group.

    `local` stands in for this rank's tensors where given (same names and shapes as `module.state_dict()`), e.g.
    DeepSpeed's fp32 master weights (`deepspeed.utils.safe_get_full_fp32_param`) for an fp32 export.
    """
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        tensor = (local[name] if local is not None and name in local else value).detach()
        if is_sharded(value):
            parts = [torch.empty_like(tensor) for _ in range(tensor_parallel_size())]
            dist.all_gather(parts, tensor.contiguous(), group=tensor_parallel_group())
            tensor = merge(parts, value.partition_dim, value.partition_stride, full_shape(value)[value.partition_dim])
        out[name] = tensor
    return out


def full_state_template(module: nn.Module) -> dict[str, torch.Tensor]:
    """Meta tensors with the full shapes and dtypes, for checking a checkpoint before loading it (no collective)."""
    return {
        name: torch.empty(full_shape(value), dtype=value.dtype, device="meta")
        for name, value in module.state_dict(keep_vars=True).items()
    }


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (TP = 1) state dict, each rank keeping its shards. Shapes are checked against the full shapes."""
    local = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if name in state and is_sharded(value):
            if state[name].shape != full_shape(value):
                raise ValueError(
                    f"{name}: shape {tuple(state[name].shape)} does not match the model's {tuple(full_shape(value))}"
                )
            local[name] = shard_like(state[name], value)
    module.load_state_dict({**state, **local})

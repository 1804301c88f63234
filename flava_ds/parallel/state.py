"""Which process groups the model's collectives use, and the megatron-core parallel state behind them.

Nothing here imports megatron-core until `initialize_parallel` is called: without it every helper answers for a
single tensor-parallel rank, so single-process use and data-parallel-only runs need no parallel state at all.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
import torch.distributed as dist


def _parallel_state() -> ModuleType | None:
    """megatron-core's parallel_state once initialised, else None (never imported here unless already imported)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state
    return None


def initialize_parallel(tensor_parallel_size: int) -> None:
    """Split the existing torch.distributed world (gloo or nccl) into tensor- and data-parallel groups.

    Call after `init_process_group` / `deepspeed.init_distributed` and before building the model. Consecutive
    ranks form a tensor-parallel group (megatron-core's order), so TP peers share a node; the data-parallel group
    holds the ranks with the same TP rank. Calling it again with the same size is a no-op.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_parallel: initialise torch.distributed first (init_process_group)")
    world = dist.get_world_size()
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size!r} must be a positive divisor of the world size {world}"
        )
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tensor_parallel_size:
            raise RuntimeError(
                f"parallel state already initialised with tensor_parallel_size={current}; call destroy_parallel() first"
            )
        return
    # megatron's gloo side groups serve its distributed optimizer, which DeepSpeed replaces here
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size, create_gloo_process_groups=False
    )


def destroy_parallel() -> None:
    """Drop the tensor/data-parallel groups (models built under them must not be used afterwards)."""
    parallel_state = _parallel_state()
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()


def tensor_parallel_size() -> int:
    parallel_state = _parallel_state()
    return 1 if parallel_state is None else parallel_state.get_tensor_model_parallel_world_size()


def tensor_parallel_rank() -> int:
    parallel_state = _parallel_state()
    return 0 if parallel_state is None else parallel_state.get_tensor_model_parallel_rank()


def tensor_parallel_group() -> dist.ProcessGroup | None:
    parallel_state = _parallel_state()
    return None if parallel_state is None else parallel_state.get_tensor_model_parallel_group()


def data_parallel_group() -> dist.ProcessGroup | None:
    """The data-parallel group when megatron-core's parallel state is set up, else the default group (None).

    The contrastive gather must span data-parallel ranks only: tensor-parallel peers hold the same samples.
    """
    parallel_state = _parallel_state()
    return None if parallel_state is None else parallel_state.get_data_parallel_group()


def data_parallel_size() -> int:
    """How many different batches one step sees (the data loader shards over this, not the world size)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(data_parallel_group())


def data_parallel_rank() -> int:
    """Which shard of the global batch this rank reads; TP peers read the same one."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(data_parallel_group())


def is_global_rank_zero() -> bool:
    """The one process that writes shared files (exports), whether or not torch.distributed is up."""
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def set_seed(seed: int) -> None:
    """Seed every rank alike, so replicated weights agree and TP shards are slices of the same full tensors.

    On CUDA with tensor parallelism megatron-core's RNG tracker is seeded too (it holds per-TP-rank streams for
    any megatron code that forks it); it is CUDA-only and nothing in this model needs it on CPU (dropout is 0).
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available() and _parallel_state() is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


class DeepSpeedMPU:
    """The model-parallel interface (`mpu`) DeepSpeed's engine queries: `deepspeed.initialize(..., mpu=...)`.

    Model parallel = tensor parallel here (no pipeline stages). With it ZeRO partitions and all-reduces over the
    data-parallel group only, gradient-norm clipping counts replicated parameters once per TP group, and engine
    checkpoints are written per TP rank (`mp_rank_XX`).
    """

    def __init__(self) -> None:
        parallel_state = _parallel_state()
        if parallel_state is None:
            raise RuntimeError("DeepSpeedMPU: call initialize_parallel(tensor_parallel_size) first")
        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())

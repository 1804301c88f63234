"""Which process groups the model's collectives use."""

from __future__ import annotations

import sys

import torch.distributed as dist


def data_parallel_group() -> dist.ProcessGroup | None:
    """The data-parallel group when megatron-core's parallel state is set up, else the default group (None).

    The contrastive gather must span data-parallel ranks only: tensor-parallel peers hold the same samples.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # never initialised unless imported
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group()
    return None

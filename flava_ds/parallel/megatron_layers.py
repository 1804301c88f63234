"""megatron-core's tensor-parallel linear layers behind `nn.Linear`'s interface (imported only at T > 1).

Built with `use_cpu_initialization=True` (allocation follows the default device, so CPU, CUDA and meta all work
and no CUDA RNG tracker is touched) and `perform_initialization=False`: the model initialises every weight itself
(`TensorParallelLinearMixin.init_normal_`), so weights do not depend on T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from flava_ds.parallel.layers import TensorParallelLinearMixin, padded_vocab_size
from flava_ds.parallel.state import tensor_parallel_group, tensor_parallel_rank, tensor_parallel_size


def _config() -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size(),
        use_cpu_initialization=True,
        perform_initialization=False,
    )


class _MegatronLinear(TensorParallelLinearMixin):
    """What both megatron-core layers need here: `_config()`, no `_extra_state` key, and a tagged weight."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, partition_dim: int, stride: int, **parallel: bool
    ):
        super().__init__(
            in_features,
            out_features,
            config=_config(),
            init_method=None,  # perform_initialization=False: never called
            bias=bias,
            stride=stride,
            tp_group=tensor_parallel_group(),
            **parallel,
        )
        self._load_state_dict_pre_hooks.clear()  # megatron's hook inserts the `_extra_state` key we drop
        # megatron tags the weight only when it initialises it; checkpoints and DeepSpeed's norms need the tags
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim, stride)


class ColumnParallel(_MegatronLinear, tensor_parallel.ColumnParallelLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, stride: int = 1):
        super().__init__(in_features, out_features, bias, partition_dim=0, stride=stride, gather_output=False)


class RowParallel(_MegatronLinear, tensor_parallel.RowParallelLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        # the weight is split along its input features; the bias is replicated
        super().__init__(
            in_features, out_features, bias, partition_dim=1, stride=1, input_is_parallel=True, skip_bias_add=False
        )


class VocabParallelDecoder(ColumnParallel):
    """Column-parallel over a vocabulary padded as Megatron pads it; padded classes get -inf logits, so they
    never win and never take probability mass in the loss."""

    def __init__(self, in_features: int, vocab_size: int):
        world = tensor_parallel_size()
        super().__init__(in_features, padded_vocab_size(vocab_size, world))
        self.vocab_size = vocab_size
        for param in (self.weight, self.bias):
            param.unpadded_size = vocab_size  # checkpoints hold the real vocabulary
        per_rank = self.output_size_per_partition
        self.num_real = min(max(vocab_size - tensor_parallel_rank() * per_rank, 0), per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        pad = logits.shape[-1] - self.num_real
        if pad == 0:
            return logits
        return F.pad(logits[..., : self.num_real], (0, pad), value=float("-inf"))

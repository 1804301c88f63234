"""Pretraining heads: masked prediction (MIM / MLM / MMM), ITM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flava_ds.parallel.layers import cross_entropy, vocab_parallel_linear


class MaskedPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder over `vocab_size` classes (BERT LM head layout).

    With `vocab_parallel` the decoder's classes are split over tensor-parallel ranks (text vocabularies);
    the logits are then this rank's classes and `loss` combines them across ranks.
    """

    def __init__(self, hidden: int, vocab_size: int, eps: float, vocab_parallel: bool = False):
        super().__init__()
        self.vocab_parallel = vocab_parallel
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = vocab_parallel_linear(hidden, vocab_size) if vocab_parallel else nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return cross_entropy(logits, labels, vocab_parallel=self.vocab_parallel, reduction=reduction)


class ITMHead(nn.Module):
    """Pooler (dense + tanh) on CLS_M, then a 2-way classifier (0 = mismatched, 1 = matched)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls)))

"""Pretraining heads: masked prediction (MIM / MLM / MMM), ITM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder over `vocab_size` classes (BERT LM head layout)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class ITMHead(nn.Module):
    """Pooler (dense + tanh) on CLS_M, then a 2-way classifier (0 = mismatched, 1 = matched)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls)))

"""Loader workers of the training streams do not hold on to the trainer's memory."""

from __future__ import annotations

import psutil
import torch
from torch.utils.data import default_collate

from flava_ds.data.sampler import ResumableDistributedSampler
from flava_ds.train.streams import CountingCollate, Stream


class _Constant:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(4)}


def test_loader_workers_do_not_pin_the_trainers_memory():
    """A worker forked from the trainer would keep every page the trainer held (weights, optimizer state) and the
    trainer's next in-place update would copy them all: one more model's worth of host memory per worker."""
    held = torch.ones(2**29)  # 2 GiB the trainer holds and then updates in place (a loader process: ~0.5 GiB)
    stream = Stream(_Constant(), CountingCollate(default_collate), ResumableDistributedSampler(64, 4), num_workers=1)
    assert stream.next_batch()["x"].shape == (4, 4)
    held.add_(1.0)
    helpers = psutil.Process().children(recursive=True)
    assert helpers, "no loader worker process was started"
    largest = max(p.memory_info().rss for p in helpers)
    assert largest < held.nbytes / 2, f"a loader process holds {largest / 2**20:.0f} MiB"

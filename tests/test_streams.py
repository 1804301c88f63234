"""Loader workers of the training streams do not hold on to the trainer's memory."""

from __future__ import annotations

import psutil
import torch
from torch.utils.data import default_collate

from flava_ds.batch import Batch
from flava_ds.data.sampler import ResumableDistributedSampler
from flava_ds.train.streams import CountingCollate, Stream


class _Constant:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(4, dtype=torch.long)}


def _collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    return Batch(**default_collate(samples))


def test_loader_workers_do_not_pin_the_trainers_memory():
    """A worker forked from the trainer would keep every page the trainer held (weights, optimizer state) and the
    trainer's next in-place update would copy them all: one more model's worth of host memory per worker."""
    held = torch.ones(2**29)  # 2 GiB the trainer holds and then updates in place (a loader process: ~0.5 GiB)
    stream = Stream(_Constant(), CountingCollate(_collate), ResumableDistributedSampler(64, 4), num_workers=1)
    assert stream.next_batch()["input_ids"].shape == (4, 4)
    held.add_(1.0)
    helpers = psutil.Process().children(recursive=True)
    assert helpers, "no loader worker process was started"
    largest = max(p.memory_info().rss for p in helpers)
    assert largest < held.nbytes / 2, f"a loader process holds {largest / 2**20:.0f} MiB"


class _Indexed:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, key) -> int:
        return key.index


def test_background_receiving_keeps_order_and_resume_positions():
    """With workers, the next batch is received while the trainer computes; the batches, and where a stream
    continues after loading an earlier position (a resumed run), are those of the in-process loader."""

    def batches(workers: int) -> list[list[int]]:
        stream = Stream(_Indexed(), default_collate, ResumableDistributedSampler(64, 4), workers)
        out = []
        for step in range(6):
            if step == 1:
                saved = stream.sampler.state_dict()
            if step == 3:  # what resuming from a checkpoint does: the batch received ahead is dropped
                stream.sampler.load_state_dict(saved)
                stream.reset()
            out.append(stream.next_batch().tolist())
            stream.sampler.advance()
        assert (stream._next is not None) == (workers > 0)  # with workers the next batch is already on its way
        return out

    expected = batches(0)
    assert expected[3] == expected[1]
    assert batches(2) == expected

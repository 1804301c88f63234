"""The training data of a run: one resumable stream per batch kind and the mixer that picks between them.

Optimizer step s of the run trains the kind `mixer.kind_for_step(s)` on every rank and micro-step; that stream's
sampler hands this rank its share of the stream's next micro-step (micro x data-parallel size; a step's
`accumulation` micro-steps make its global batch) and moves on only when the trainer calls `advance(kind)`.
The whole position is `state_dict()`, saved in every checkpoint.

Every dataset is wrapped in `TolerantDataset` (a sample that fails to decode is replaced and counted; each
`Batch` carries the count as `bad_samples`), and loader workers and their fork server ignore SIGTERM/SIGUSR1:
SLURM signals every process of a job, and only the trainer decides when to stop (a dead worker would abort the
checkpoint).

With workers, a stream receives its next batch in a background thread while the trainer computes: taking a
batch from a worker (unpickling, attaching each tensor's shared memory) costs the receiving process time that a
small model's step notices when it happens between steps (docs/BENCHMARKS.md §2.3). Order and resume positions are
unchanged: the
thread only receives, in order, what the sampler's iterator would give next anyway.

Workers start from a fork server, not by forking the trainer: a worker forked from the trainer keeps the pages of
everything the trainer held at that moment, and every in-place update of weights, gradients and optimizer state in
host memory (CPU training, ZeRO-Offload) then copies them, so each worker start pinned another model's worth of
memory (FLAVA-full on CPU, until the kernel killed the job: docs/BENCHMARKS.md §2.3).
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from flava_ds.batch import Batch
from flava_ds.data.arrow_dataset import ArrowShards
from flava_ds.data.image_dataset import ImageAugment, ImageDataset
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.sampler import BlendedDataset, DataPosition, KindMixer, ResumableDistributedSampler
from flava_ds.data.text_dataset import TextDataset
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.data.tolerant import BAD_SAMPLES, TolerantDataset
from flava_ds.parallel.state import data_parallel_rank, data_parallel_size
from flava_ds.train.config import DataSection, StreamConfig


def _worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flava_ds.train.loader_server"])  # stop signals ignored, readers imported
    return context


def _ignore_stop_signals(worker_id: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def release_semaphore_names(iterator: Any) -> None:
    """Unlink the names of the loader's semaphores once every worker has opened them.

    Under forkserver, `multiprocessing` gives each lock and queue semaphore a name in /dev/shm (`sem.mp-*`) so
    workers can open it, and unlinks it only at a clean exit or from its resource tracker; a SIGKILLed job (a node
    failure, `scancel`) kills the tracker too, and 14 names per stream per rank stayed behind. Workers keep their
    mappings, so unlinking the names now leaves nothing to leak. Touches `multiprocessing` and DataLoader
    internals; where they differ, nothing is found and nothing is done."""
    import _multiprocessing
    from multiprocessing import resource_tracker, synchronize, util

    names: set[str] = set()

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, synchronize.SemLock):
            if getattr(obj._semlock, "name", None):
                names.add(obj._semlock.name)
        elif depth and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth - 1)

    owners = (*getattr(iterator, "_index_queues", ()), getattr(iterator, "_worker_result_queue", None))
    for owner in (*owners, getattr(iterator, "_workers_done_event", None)):
        visit(owner, 2)  # Queue -> its locks; Event -> Condition -> its semaphores
    for name in names:
        _multiprocessing.sem_unlink(name)
        resource_tracker.unregister(name, "semaphore")
    for finalizer in list(util._finalizer_registry.values()):  # their unlink-at-exit would now fail
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup and finalizer._args[0] in names:
            finalizer.cancel()


class CountingCollate:
    """The dataset's collator, and in the batch's `bad_samples` how many of its reads failed and were replaced."""

    def __init__(self, collate: Callable[[Sequence[dict[str, Any]]], Batch]):
        self.collate = collate

    def __call__(self, samples: Sequence[dict[str, Any]]) -> Batch:
        batch = self.collate(samples)
        batch.bad_samples = sum(s.get(BAD_SAMPLES, 0) for s in samples)
        return batch


@dataclass
class Stream:
    dataset: Any
    collate: Any
    sampler: ResumableDistributedSampler
    num_workers: int
    _iterator: Iterator[Batch] | None = None
    _receiver: ThreadPoolExecutor | None = None
    _next: Future | None = None  # the batch after the one last returned, being received (workers only)
    _received: int = 0  # batches returned by the current iterator

    def next_batch(self) -> Batch:
        if self._iterator is None:  # (re)start prefetching from the sampler's current position
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                prefetch_factor=4 if self.num_workers else None,
                worker_init_fn=_ignore_stop_signals if self.num_workers else None,
                multiprocessing_context=_worker_context() if self.num_workers else None,
            )
            self._iterator = iter(loader)
            self._received = 0
        batch = self._next.result() if self._next is not None else next(self._iterator)
        self._received += 1
        if self._received == self.num_workers:  # batch w came from worker w: every worker is up
            release_semaphore_names(self._iterator)
        if self.num_workers:
            if self._receiver is None:
                self._receiver = ThreadPoolExecutor(1, thread_name_prefix="flava-ds-batch-receiver")
            self._next = self._receiver.submit(next, self._iterator)
        return batch

    def reset(self) -> None:
        if self._next is not None:  # let the receiver finish with the old iterator; its batch is dropped
            self._next.exception()
        self._iterator = self._next = None

    def close(self) -> None:
        """Kill the loader workers (they hold nothing to save, and ignore SIGTERM) and drop the iterator. Never
        waits on a worker, so it is safe on a fatal error; the receiver thread, if mid-batch, sees the workers
        gone and ends."""
        for worker in getattr(self._iterator, "_workers", ()):
            worker.kill()
        if self._receiver is not None:
            self._receiver.shutdown(wait=False, cancel_futures=True)
        self._iterator = self._next = self._receiver = None


class TrainStreams:
    def __init__(
        self,
        data: DataSection,
        tokenizer: Tokenizer | None,
        crop_size: int,
        micro_batch: int,
        accumulation: int = 1,
    ):
        """This data-parallel rank's streams (TP peers read the same batches): `micro_batch` samples per
        micro-step, `accumulation` micro-steps per optimizer step."""
        dp_rank, dp_size = data_parallel_rank(), data_parallel_size()
        self.mixer = KindMixer(data.active_ratios(), seed=data.seed)
        self.streams: dict[str, Stream] = {}
        for kind in self.mixer.kinds:
            paths = getattr(data, kind).paths
            datasets = [self._dataset(kind, path, data, tokenizer, crop_size) for path in paths]
            collate = CountingCollate(datasets[0].collator())
            datasets = [TolerantDataset(d, f"{kind} {p}") for d, p in zip(datasets, paths)]
            dataset, source = self._blend(datasets, getattr(data, kind), data.seed)
            sampler = ResumableDistributedSampler(
                source, micro_batch, dp_rank=dp_rank, dp_size=dp_size, accumulation=accumulation, seed=data.seed
            )
            self.streams[kind] = Stream(dataset, collate, sampler, data.num_workers)
        self.position = DataPosition(self.mixer, {k: s.sampler for k, s in self.streams.items()})
        self.wait_seconds = 0.0  # time the trainer spent blocked on data

    @staticmethod
    def _dataset(kind: str, path: str, data: DataSection, tokenizer: Tokenizer | None, crop: int):
        """A dataset of one stream, with the run's seed (and masking probability where it masks text)."""
        if kind == "text":
            return TextDataset(
                path, tokenizer, data.text_max_length, data.verify_checksums, seed=data.seed, mlm_prob=data.mlm_prob
            )
        shards = ArrowShards(path, verify_checksums=data.verify_checksums)
        augment = ImageAugment(crop_size=crop)
        if kind == "image_text":
            return ImageTextDataset(
                shards,
                tokenizer,
                augment,
                seed=data.seed,
                itm_negative_prob=data.itm_negative_prob,
                mlm_prob=data.mlm_prob,
            )
        return ImageDataset(shards, augment, seed=data.seed)

    @staticmethod
    def _blend(datasets: list, stream: StreamConfig, seed: int):
        if len(datasets) == 1:
            return datasets[0], len(datasets[0])
        blended = BlendedDataset(datasets)
        weights = stream.weights or [1.0] * len(datasets)
        return blended, blended.blend(weights, seed)

    def kind(self, step: int) -> str:
        """The batch kind of optimizer step `step` (0-based), for all of its micro-steps."""
        return self.mixer.kind_for_step(step)

    def next_batch(self, kind: str) -> Batch:
        start = time.perf_counter()
        batch = self.streams[kind].next_batch()
        self.wait_seconds += time.perf_counter() - start
        return batch

    def current_keys(self, kind: str) -> list:
        """The SampleKeys of this rank's batch at the stream's current position (what next_batch returned)."""
        sampler = self.streams[kind].sampler
        return sampler.micro_batch(sampler.consumed_samples)

    def epochs(self) -> dict[str, float]:
        """Per stream, the epochs its samples seen make (of a blend: of all its datasets' samples together)."""
        out = {}
        for kind, stream in self.streams.items():
            sampler = stream.sampler
            size = sampler.samples_per_epoch or sum(sampler.source.sizes)
            out[kind] = sampler.consumed_samples / size
        return out

    def advance(self, kind: str) -> None:
        self.streams[kind].sampler.advance()

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)
        for stream in self.streams.values():
            stream.reset()

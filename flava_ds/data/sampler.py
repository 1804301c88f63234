"""Deterministic, resumable data order: per-stream samplers, weighted blending and the kind mixer.

A stream's order is a pure function of (seed, global batch size, consumed samples), so a checkpoint
only stores `consumed_samples` and a resumed run sees exactly the samples an uninterrupted one
would. Samplers yield `SampleKey`s (index + the epoch of that index) instead of bare indices so
that datasets can draw per-sample randomness (masks, crops, ITM negatives) from
`sample_rng(seed, key)`: different every epoch, identical after a resume, and independent of the
number of data-parallel ranks or loader workers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


class SampleKey(NamedTuple):
    """Which sample to load: `index` into dataset `dataset` (0 unless blended), drawn in `epoch`."""

    index: int
    epoch: int = 0
    dataset: int = 0


def sample_rng(seed: int, key: SampleKey | int, *extra: int) -> np.random.Generator:
    """The random generator of one sample draw: a pure function of (seed, key, extra)."""
    key = key if isinstance(key, SampleKey) else SampleKey(int(key))
    return np.random.default_rng([seed, key.dataset, key.epoch, key.index, *extra])


FEISTEL_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class EpochOrder:
    """One epoch's order over `n` items without materialising it: position p -> item ``order[p]``.

    A keyed pseudo-random bijection of [0, n): a Feistel network (FEISTEL_ROUNDS rounds, round keys drawn from
    the seed) permutes the smallest domain of 2^bits >= n values, and positions landing outside [0, n) are
    walked through it again until they land inside (cycle walking keeps it a bijection of [0, n); the domain
    is under 2n, so a walk takes under 2 passes on average). Memory and time are O(positions asked), whatever n is: a
    permutation of 2e9 samples used to cost 15 GB and minutes per stream per rank at its first batch."""

    def __init__(self, n: int, seed: int | tuple[int, ...], epoch: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError(f"an epoch order needs at least one item, got {n}")
        self.n, self.epoch, self.shuffle = int(n), epoch, shuffle
        self.bits = max(2, (self.n - 1).bit_length())  # the domain 2^bits is under 2n
        seed = seed if isinstance(seed, tuple) else (seed,)
        self.round_keys = np.random.default_rng([*seed, epoch]).integers(0, 2**63, FEISTEL_ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        """One pass of the network over `bits`-bit values: each round maps (L, R) of widths (a, b) to
        (R, L ^ F(R)) of widths (b, a), a bijection whatever the split, so odd widths need no padding."""
        high, low = self.bits - self.bits // 2, self.bits // 2
        for key in self.round_keys:
            left, right = x >> np.uint64(low), x & np.uint64((1 << low) - 1)
            mixed = left ^ (_mix64(right ^ key) & np.uint64((1 << high) - 1))
            x = (right << np.uint64(high)) | mixed
            high, low = low, high
        return x

    def __getitem__(self, positions: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        """Items at `positions` (a slice or indices in [0, n)), int64."""
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(self.n))
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        if not self.shuffle:
            return positions.copy()
        items = self._feistel(positions.astype(np.uint64))
        outside = items >= np.uint64(self.n)
        while outside.any():
            items[outside] = self._feistel(items[outside])
            outside = items >= np.uint64(self.n)
        return items.astype(np.int64)


class BlendedIndex:
    """Weighted blend of several datasets, like Megatron's BlendedDataset, as an endless sample stream.

    Stream position p goes to dataset `d` by greedy error minimisation (each position picks the
    dataset furthest below its weighted share), computed for a block of `block_size` positions and
    repeated, so the shares hold to within 1/block_size at every block end and memory stays bounded.
    Each dataset's draws walk through its own epochs, each in a (seed, dataset, epoch) order.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int = 0, block_size: int = 10_000):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per dataset; got {len(sizes)} sizes and {len(weights)} weights")
        if any(int(n) <= 0 for n in sizes):
            raise ValueError(f"every blended dataset must be non-empty; sizes {list(sizes)}")
        weights = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"blend weights must be finite, non-negative and not all zero; got {weights.tolist()}")
        self.sizes = [int(n) for n in sizes]
        self.weights = weights / weights.sum()
        self.seed = seed
        self.block_size = block_size
        self._block_dataset, self._block_rank, self._block_counts = self._greedy_block()
        self._orders: dict[int, EpochOrder] = {}

    def _greedy_block(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        dataset = np.empty(self.block_size, dtype=np.int64)
        rank = np.empty(self.block_size, dtype=np.int64)
        for p in range(self.block_size):
            d = int(np.argmax(self.weights * (p + 1) - counts))
            dataset[p], rank[p] = d, counts[d]
            counts[d] += 1
        return dataset, rank, counts

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "weights": self.weights.tolist(), "seed": self.seed, "block": self.block_size}

    def locate(self, positions: np.ndarray | Sequence[int]) -> list[SampleKey]:
        """Stream positions -> (dataset, index in that dataset, that dataset's epoch)."""
        positions = np.asarray(positions, dtype=np.int64)
        block, offset = np.divmod(positions, self.block_size)
        datasets = self._block_dataset[offset]
        draws = block * self._block_counts[datasets] + self._block_rank[offset]
        epochs, within = np.empty_like(draws), np.empty_like(draws)
        items = np.empty_like(draws)
        for d in np.unique(datasets).tolist():
            mine = datasets == d
            epochs[mine], within[mine] = np.divmod(draws[mine], self.sizes[d])
            for epoch in np.unique(epochs[mine]).tolist():
                these = mine & (epochs == epoch)
                items[these] = self._order(d, epoch)[within[these]]
        return [SampleKey(*key) for key in zip(items.tolist(), epochs.tolist(), datasets.tolist())]

    def _order(self, dataset: int, epoch: int) -> EpochOrder:
        """Dataset `dataset`'s order in its epoch `epoch` (the latest epoch of each dataset is kept)."""
        order = self._orders.get(dataset)
        if order is None or order.epoch != epoch:
            order = EpochOrder(self.sizes[dataset], (self.seed, dataset), epoch)
            self._orders[dataset] = order
        return order


class BlendedDataset:
    """The datasets of a blend behind one `dataset[key]`: `key.dataset` picks which one serves the key."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: SampleKey) -> Any:
        return self.datasets[key.dataset][key]

    def blend(self, weights: Sequence[float], seed: int = 0) -> BlendedIndex:
        """The weighted stream over these datasets, to pass as a sampler's source."""
        return BlendedIndex([len(d) for d in self.datasets], weights, seed)


class ResumableDistributedSampler:
    """Batch sampler over one stream, sharded over data-parallel ranks and resumable at any global batch.

    The stream is cut into global batches of G = micro_batch_size * dp_size * accumulation samples (one optimizer
    step), each into `accumulation` micro-steps of micro * dp_size; rank r gets items [r * micro, (r + 1) * micro)
    of each micro-step, so the samples of a step are the same G stream positions whatever the shape (ranks x
    micro x accumulation) that cuts them: a checkpoint resumes on any shape with the same G. Over one dataset of
    `source` samples each epoch is a (seed, epoch) pseudo-random order with the incomplete last global batch
    dropped, and epochs roll over forever. With a `BlendedIndex` as `source` the stream is the blend's endless
    sequence.

    Iterating yields lists of `SampleKey` starting at `consumed_samples` and does not move it: the
    trainer calls `advance()` for every micro-step it trains on, so loader prefetching never
    leaks into checkpoints (`state_dict`, taken between optimizer steps).
    """

    def __init__(
        self,
        source: int | BlendedIndex,
        micro_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        accumulation: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        consumed_samples: int = 0,
    ):
        if micro_batch_size <= 0 or dp_size <= 0 or accumulation <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"bad sharding: micro_batch_size={micro_batch_size}, accumulation={accumulation}, "
                f"rank {dp_rank} of {dp_size}"
            )
        self.source = source if isinstance(source, BlendedIndex) else int(source)
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.micro_step_size = micro_batch_size * dp_size  # samples of one micro-step over all ranks
        self.global_batch_size = self.micro_step_size * accumulation
        if isinstance(self.source, int) and self.source < self.global_batch_size:
            raise ValueError(
                f"dataset of {self.source} samples is smaller than one global batch ({self.global_batch_size})"
            )
        self._check_consumed(consumed_samples, self.global_batch_size)
        self.consumed_samples = consumed_samples
        self._epoch_cache: tuple[int, EpochOrder] | None = None

    @staticmethod
    def _check_consumed(consumed: int, unit: int) -> None:
        if consumed < 0 or consumed % unit:
            raise ValueError(f"consumed_samples {consumed} is not a multiple of the global batch {unit}")

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples used per epoch (incomplete last global batch dropped); None for a blend."""
        if isinstance(self.source, BlendedIndex):
            return None
        return self.source // self.global_batch_size * self.global_batch_size

    @property
    def epoch(self) -> int:
        spe = self.samples_per_epoch
        return 0 if spe is None else self.consumed_samples // spe

    def _order(self, epoch: int) -> EpochOrder:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, EpochOrder(self.source, self.seed, epoch, self.shuffle))
        return self._epoch_cache[1]

    def _keys(self, first: int, count: int) -> list[SampleKey]:
        """Keys of stream positions [first, first + count), which lie inside one global batch."""
        if isinstance(self.source, BlendedIndex):
            return self.source.locate(np.arange(first, first + count))
        epoch, offset = divmod(first, self.samples_per_epoch)
        return [SampleKey(i, epoch) for i in self._order(epoch)[offset : offset + count].tolist()]

    def micro_batch(self, consumed: int) -> list[SampleKey]:
        """This rank's share of the micro-step starting at `consumed`."""
        self._check_consumed(consumed, self.micro_step_size)
        return self._keys(consumed + self.dp_rank * self.micro_batch_size, self.micro_batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        consumed = self.consumed_samples
        while True:
            yield self.micro_batch(consumed)
            consumed += self.micro_step_size

    def advance(self, num_micro_steps: int = 1) -> None:
        """Record that the trainer trained on this many micro-steps of this stream."""
        self.consumed_samples += num_micro_steps * self.micro_step_size

    def state_dict(self) -> dict[str, Any]:
        source = self.source.state_dict() if isinstance(self.source, BlendedIndex) else self.source
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "source": source,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume; the stream must be the same one (seed, data, global batch), else the order would differ."""
        mine = self.state_dict()
        for field in ("seed", "shuffle", "global_batch_size", "source"):
            if state[field] != mine[field]:
                raise ValueError(
                    f"cannot resume this stream: checkpoint {field}={state[field]!r} but now {mine[field]!r}; "
                    "the sample order would not continue where it stopped"
                )
        self._check_consumed(int(state["consumed_samples"]), self.global_batch_size)
        self.consumed_samples = int(state["consumed_samples"])


class KindMixer:
    """Which batch kind each training step uses: a pure function of (seed, step).

    Every rank computes the same answer without communication. Ratios are relative weights.
    """

    def __init__(self, ratios: Mapping[str, float], seed: int = 0):
        if not ratios:
            raise ValueError("task ratios are empty; give at least one task a positive ratio")
        bad = {
            name: r for name, r in ratios.items() if not (isinstance(r, numbers.Real) and math.isfinite(r) and r >= 0)
        }
        if bad:
            raise ValueError(f"task ratios must be finite non-negative numbers; bad: {bad}")
        total = float(sum(ratios.values()))
        if total <= 0:
            raise ValueError(f"task ratios sum to 0; give at least one task a positive ratio: {dict(ratios)}")
        # Sorted names: the draw must not depend on the order a config listed the kinds in.
        self.kinds = sorted(name for name, r in ratios.items() if r > 0)
        self.probs = np.array([ratios[name] / total for name in self.kinds])
        self._cumulative = np.cumsum(self.probs)
        self.ratios = dict(ratios)
        self.seed = seed

    def kind_for_step(self, step: int) -> str:
        u = np.random.default_rng([self.seed, step]).random()
        i = int(np.searchsorted(self._cumulative, u, side="right"))
        return self.kinds[min(i, len(self.kinds) - 1)]

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": self.ratios, "seed": self.seed}


class DataPosition:
    """The whole data position of a run (kind mixer + one sampler per stream), one checkpoint entry."""

    def __init__(self, mixer: KindMixer, samplers: Mapping[str, ResumableDistributedSampler]):
        missing = set(mixer.kinds) - set(samplers)
        if missing:
            raise ValueError(f"kinds {sorted(missing)} have a positive ratio but no sampler")
        self.mixer = mixer
        self.samplers = dict(samplers)

    def state_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict(), "streams": {k: s.state_dict() for k, s in self.samplers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, sampler in self.samplers.items():
            if name not in state["streams"]:
                raise ValueError(f"checkpoint has no position for stream {name!r}; it has {sorted(state['streams'])}")
            sampler.load_state_dict(state["streams"][name])

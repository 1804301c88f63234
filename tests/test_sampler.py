"""Deterministic data order: exact resume, rank sharding, weighted blending, task mixing across processes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from flava_ds.data.sampler import (
    BlendedDataset,
    BlendedIndex,
    DataPosition,
    EpochOrder,
    KindMixer,
    ResumableDistributedSampler,
    SampleKey,
    sample_rng,
)


def take(sampler: ResumableDistributedSampler, n: int) -> list[list[SampleKey]]:
    return list(itertools.islice(sampler, n))


def test_an_epoch_order_visits_every_index_exactly_once_at_every_size():
    for n in [*range(1, 5001), 10**6 + 3]:
        order = EpochOrder(n, (3, 1), epoch=n % 7)[0:n]
        assert order.size == n and np.array_equal(np.bincount(order, minlength=n), np.ones(n, np.int64)), n


def test_an_epoch_order_is_shuffled_differently_per_seed_and_epoch():
    n = 5000
    first = EpochOrder(n, 0, 0)[0:n]
    assert not np.array_equal(first, EpochOrder(n, 0, 1)[0:n]) and not np.array_equal(first, EpochOrder(n, 1, 0)[0:n])
    # no structure left: consecutive positions land far apart, and any 500 positions spread over the range
    assert np.median(np.abs(np.diff(first))) > n / 8
    counts = np.bincount(first[1000:1500] * 10 // n, minlength=10)
    assert counts.min() > 25 and counts.max() < 80  # 50 expected per tenth
    np.testing.assert_array_equal(EpochOrder(n, 0, 0)[[4999, 0, 17]], first[[4999, 0, 17]])
    np.testing.assert_array_equal(EpochOrder(n, 0, 0, shuffle=False)[0:n], np.arange(n))


def test_the_first_batch_of_a_huge_stream_holds_no_per_sample_state():
    """At 2e9 samples (LAION scale) a materialised permutation is 16 GB per stream per rank; the order is computed
    per position instead, so building the sampler and drawing a batch mid-epoch allocates almost nothing."""
    import tracemalloc

    tracemalloc.start()
    sampler = ResumableDistributedSampler(2 * 10**9, 256, dp_rank=5, dp_size=8, seed=1, consumed_samples=2048 * 10**5)
    batch = next(iter(sampler))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(batch) == 256 and len({k.index for k in batch}) == 256
    assert peak < 10 * 2**20, f"{peak / 2**20:.1f} MiB"
    blend = ResumableDistributedSampler(
        BlendedIndex([7 * 10**7, 2 * 10**9], [0.3, 0.7]), 64, consumed_samples=64 * 10**6
    )
    assert len({(k.dataset, k.index) for k in next(iter(blend))}) == 64


def test_epochs_are_permutations_dropping_the_incomplete_global_batch():
    sampler = ResumableDistributedSampler(103, 4, seed=7)
    assert sampler.samples_per_epoch == 100
    batches = take(sampler, 50)
    epochs = [[k for b in batches[e * 25 : (e + 1) * 25] for k in b] for e in range(2)]
    for e, keys in enumerate(epochs):
        assert {k.epoch for k in keys} == {e}
        assert len({k.index for k in keys}) == 100 and all(0 <= k.index < 103 for k in keys)
    assert [k.index for k in epochs[0]] != [k.index for k in epochs[1]]
    assert take(ResumableDistributedSampler(103, 4, seed=8), 1) != batches[:1]


@pytest.mark.parametrize("source", ["single", "blend"])
@pytest.mark.parametrize("consumed", [0, 8, 100, 132])
def test_resume_yields_exactly_the_remaining_order(source, consumed):
    make = lambda **kw: ResumableDistributedSampler(
        103 if source == "single" else BlendedIndex([30, 5], [0.7, 0.3], seed=1), 4, seed=7, **kw
    )
    full = take(make(), 60)
    assert take(make(consumed_samples=consumed), 60 - consumed // 4) == full[consumed // 4 :]
    # the same through a checkpoint: advance, state_dict, load into a fresh sampler
    trained = make()
    trained.advance(consumed // 4)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(trained.state_dict())))
    assert resumed.consumed_samples == consumed
    assert take(resumed, 5) == full[consumed // 4 : consumed // 4 + 5]


def test_iterating_does_not_move_the_checkpointed_position():
    sampler = ResumableDistributedSampler(50, 5)
    take(sampler, 7)  # a prefetching loader runs ahead of training
    assert sampler.state_dict()["consumed_samples"] == 0
    sampler.advance(2)
    assert sampler.state_dict()["consumed_samples"] == 10
    assert sampler.epoch == 0


@pytest.mark.parametrize("source", ["single", "blend"])
@pytest.mark.parametrize(("micro", "dp"), [(3, 2), (2, 3), (1, 6)])
def test_rank_streams_union_is_the_one_rank_stream(source, micro, dp):
    make_source = lambda: 40 if source == "single" else BlendedIndex([11, 29], [0.5, 0.5], seed=3)
    one_rank = take(ResumableDistributedSampler(make_source(), 6, seed=5, consumed_samples=12), 20)
    ranks = [
        take(ResumableDistributedSampler(make_source(), micro, dp_rank=r, dp_size=dp, seed=5, consumed_samples=12), 20)
        for r in range(dp)
    ]
    for step, global_batch in enumerate(one_rank):
        assert all(len(stream[step]) == micro for stream in ranks)
        assert [k for stream in ranks for k in stream[step]] == global_batch


def test_bad_positions_and_mismatched_checkpoints_are_errors():
    with pytest.raises(ValueError, match="not a multiple of the global batch 8"):
        ResumableDistributedSampler(100, 4, dp_size=2, consumed_samples=6)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableDistributedSampler(5, 4, dp_size=2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ResumableDistributedSampler(100, 4, dp_rank=2, dp_size=2)
    state = ResumableDistributedSampler(100, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="checkpoint seed=1 but now 2"):
        ResumableDistributedSampler(100, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableDistributedSampler(100, 2, seed=1).load_state_dict(state)


def test_blend_weights_hold_and_each_dataset_walks_its_own_epochs():
    weights = [0.5, 0.3, 0.2]
    blend = BlendedIndex([50, 1000, 7], weights, seed=4)
    keys = blend.locate(np.arange(10_000))
    counts = Counter(k.dataset for k in keys)
    for d, w in enumerate(weights):
        assert abs(counts[d] / 10_000 - w) < 0.01 * w
    small = [k for k in keys if k.dataset == 2]
    for epoch in range(5):
        chunk = small[epoch * 7 : (epoch + 1) * 7]
        assert sorted(k.index for k in chunk) == list(range(7)) and {k.epoch for k in chunk} == {epoch}
    assert small[:7] != small[7:14], "each epoch has its own order"
    assert BlendedIndex([50, 1000, 7], weights, seed=4).locate(range(9_000, 10_000)) == keys[9_000:]
    # positions past one greedy block keep the shares and stay deterministic
    later = Counter(k.dataset for k in blend.locate(np.arange(25_000, 35_000)))
    assert all(abs(later[d] / 10_000 - w) < 0.01 * w for d, w in enumerate(weights))


def test_blended_dataset_serves_each_key_from_its_dataset():
    data = BlendedDataset([Named("a", 5), Named("b", 20)])
    sampler = ResumableDistributedSampler(data.blend([0.2, 0.8], seed=1), 10)
    items = [data[k] for k in take(sampler, 10)[0]]
    assert len(data) == 25 and sum(i.startswith("a") for i in items) == 2 and len(set(items)) == 10


class Named:
    """A keyed dataset of `size` named items."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: SampleKey) -> str:
        assert 0 <= key.index < self.size
        return f"{self.name}{key.index}"


def test_blend_validation():
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedIndex([1, 2], [1.0])
    with pytest.raises(ValueError, match="not all zero"):
        BlendedIndex([1, 2], [0, 0])
    with pytest.raises(ValueError, match="non-empty"):
        BlendedIndex([0, 2], [1, 1])


RATIOS = {"image_text": 0.5, "text": 0.2, "image": 0.3, "off": 0.0}
MIXER_SCRIPT = """
import json, sys
from flava_ds.data.sampler import KindMixer
ratios = json.loads(sys.argv[1])
print(json.dumps([KindMixer(ratios, seed=11).kind_for_step(s) for s in range(2000)]))
"""


def test_task_mixer_agrees_across_processes():
    """Two real processes (as two ranks would be), different hash seeds and dict order, same draws."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIXER_SCRIPT, json.dumps(ratios)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(rank + 1)},
        )
        for rank, ratios in enumerate([RATIOS, dict(reversed(list(RATIOS.items())))])
    ]
    outputs = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert outputs[0] == [KindMixer(RATIOS, seed=11).kind_for_step(s) for s in range(2000)]
    assert outputs[0] != [KindMixer(RATIOS, seed=12).kind_for_step(s) for s in range(2000)]


def test_task_mixer_frequencies_match_ratios():
    mixer = KindMixer(RATIOS, seed=0)
    counts = Counter(mixer.kind_for_step(s) for s in range(20_000))
    assert counts["off"] == 0
    for task in ("image_text", "text", "image"):
        assert abs(counts[task] / 20_000 - RATIOS[task]) < 0.015
    assert mixer.kind_for_step(12345) == KindMixer(RATIOS, seed=0).kind_for_step(12345)


@pytest.mark.parametrize(
    ("ratios", "message"),
    [({}, "empty"), ({"a": -1.0}, "non-negative"), ({"a": float("nan")}, "non-negative"), ({"a": 0}, "sum to 0")],
)
def test_task_mixer_validation(ratios, message):
    with pytest.raises(ValueError, match=message):
        KindMixer(ratios)


def test_data_position_round_trip():
    def make():
        mixer = KindMixer({"text": 1, "image": 1}, seed=0)
        return DataPosition(
            mixer, {"text": ResumableDistributedSampler(64, 4), "image": ResumableDistributedSampler(32, 2)}
        )

    run = make()
    run.samplers["text"].advance(3)
    run.samplers["image"].advance(1)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    assert [s.consumed_samples for s in resumed.samplers.values()] == [12, 2]
    with pytest.raises(ValueError, match="no sampler"):
        DataPosition(KindMixer({"text": 1, "image": 1}), {"text": ResumableDistributedSampler(64, 4)})


class KeyEcho:
    """A dataset returning its key's per-sample random draw, as real datasets draw masks and crops."""

    def __getitem__(self, key: SampleKey):
        return key, float(sample_rng(3, key).random())


def test_works_as_a_dataloader_batch_sampler_with_workers():
    sampler = ResumableDistributedSampler(40, 4, seed=2)
    loader = DataLoader(KeyEcho(), batch_sampler=sampler, collate_fn=list, num_workers=2)
    batches = list(itertools.islice(loader, 12))
    assert [[key for key, _ in b] for b in batches] == take(sampler, 12)
    draws = {key: value for b in batches for key, value in b}
    assert draws[batches[0][0][0]] == KeyEcho()[batches[0][0][0]][1], "per-sample randomness is process independent"
    assert len(set(draws.values())) == len(draws)

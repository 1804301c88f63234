"""Shards over the input, as a converter sees them: the records of one shard in, a ``ShardResult`` out.

Shard k is defined over the INPUT (see ``preprocess/common.py``): ``fixed_size_shards`` cuts one record stream
every ``--shard-size`` records; readers that can read a row range cut their own (``row_range_shards``), and a
converter whose input comes in units (tars) makes one shard per unit.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flava_ds.shard_format import TMP_PREFIX

EXAMPLES_PER_REASON = 5


@dataclass
class ShardResult:
    """What a converter reports for one shard; count skips with ``skip`` so examples are kept."""

    samples: int
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "where: why"
    dropped: Counter = field(default_factory=Counter)  # parts of kept samples left out (captions), by reason

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(where)


@dataclass
class ShardTask:
    """One output shard to produce: its records and where to write its files."""

    index: int
    first_record: int | None  # None where shards are input units (tars), not record ranges
    records: list[tuple[int, Any]]
    output_dir: Path
    name: str
    progress: Callable[[int], None] = lambda n: None  # call with the samples written as they are

    def tmp_path(self, suffix: str) -> Path:
        return self.output_dir / f"{TMP_PREFIX}{self.name}{suffix}"

    def final_path(self, suffix: str) -> Path:
        return self.output_dir / f"{self.name}{suffix}"


@dataclass(frozen=True)
class ShardInput:
    """The input records of one output shard, read only when this machine converts it."""

    first_record: int | None
    load: Callable[[], list[Any]]


def fixed_size_shards(records: Iterable[Any], size: int) -> Iterator[ShardInput]:
    """Shard k = records [k * size, (k + 1) * size) of one stream (read in full by every machine, to count)."""
    it = iter(records)
    for k in itertools.count():
        block = list(itertools.islice(it, size))
        if not block:
            return
        yield ShardInput(k * size, lambda block=block: block)


def fixed_size_rows(total: int | None, size: int) -> list[int] | None:
    """The records of each fixed-size shard of `total` records (None when the total is not known)."""
    if total is None:
        return None
    return [min(size, total - start) for start in range(0, total, size)]


def shard_name(index: int) -> str:
    """The file name (without suffix) of output shard `index`; the same on every machine."""
    return f"shard-{index:06d}"

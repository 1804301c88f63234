"""Bad samples at read time: replaced deterministically and counted, so one broken record never stops a run.

Start-up checks (manifest sizes, optional sha256, `.bin`/`.idx` agreement, Arrow offsets) catch damaged files;
a sample whose bytes are intact on disk but do not decode (a corrupt JPEG inside a shard, caption or text token
ids beyond the tokenizer's vocabulary, codebook tokens beyond the codebook: `check_ids`) is only found when it
is read; its error names the file and the row or sequence, and the first failures are logged.
`TolerantDataset` then serves the next index of the same dataset instead (index + 1, + 2, ... in the same
epoch), so every rank still gets a full micro-batch (the contrastive gather needs equal batch sizes) and a
resumed run makes the same substitution. The sample dict carries ``bad_samples`` (how many reads failed on the
way) for the trainer to count.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from flava_ds.data.sampler import SampleKey

log = logging.getLogger(__name__)
BAD_SAMPLES = "bad_samples"


def check_ids(ids: np.ndarray, limit: int, what: str, where: str) -> None:
    """ValueError (so the sample is replaced) when an id is outside [0, `limit`): the model would index out of range."""
    outside = ids[(ids < 0) | (ids >= limit)]
    if outside.size:
        raise ValueError(f"{where}: {what} {int(outside[0])} out of range [0, {limit})")


class BadDataError(RuntimeError):
    """Every replacement candidate failed too: the data is broken beyond single samples."""


class TolerantDataset(Dataset):
    def __init__(self, dataset: Any, name: str, max_attempts: int = 8):
        self.dataset = dataset
        self.name = name
        self.max_attempts = max_attempts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key))
        failures = []
        for attempt in range(self.max_attempts):
            candidate = key._replace(index=(key.index + attempt) % len(self.dataset))
            try:
                sample = self.dataset[candidate]
            except Exception as err:  # decoders raise many types on corrupt bytes
                failures.append(f"{candidate}: {type(err).__name__}: {err}")
                log.warning("%s: sample %s failed to load (%s); replacing it", self.name, candidate, failures[-1])
                continue
            if failures:
                sample[BAD_SAMPLES] = len(failures)
            return sample
        raise BadDataError(f"{self.name}: {self.max_attempts} consecutive samples failed to load: {failures}")

"""Text-only MLM samples from Megatron indexed datasets (written by `preprocess/text.py`).

Each stored sequence (one document in files from `preprocess/text.py`) is cut into as few windows
of at most `max_length - 2` tokens as possible, of near-equal length (no tiny tail window); a sample
is `[CLS] window [SEP]`. The window table is computed once from the index, so sample i is the same
window on every rank and every run. `TextCollator` pads a batch and applies whole-word MLM masking
with randomness drawn from `sample_rng(seed, key)`, so a resumed run masks exactly like an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from flava_ds.batch import Batch
from flava_ds.data.masking import mask_tokens
from flava_ds.data.sampler import SampleKey, sample_rng
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.data.tolerant import check_ids
from flava_ds.shard_format import IGNORE_INDEX, ShardError, check_file, manifest_paths

with warnings.catch_warnings():
    # megatron-core warns that Apex / Transformer Engine are missing; the indexed format needs neither.
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

__all__ = [
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "TextCollator",
    "TextDataset",
    "merged_manifest",
    "recorded_tokenizer",
    "resolve_prefixes",
]


def resolve_prefixes(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Dataset prefixes from prefixes and/or `preprocess/text.py` output directories (their merged files)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    prefixes = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            manifests = manifest_paths(item)
            merged = [json.loads(m.read_text()).get("merged") for m in manifests]
            if not manifests or None in merged:
                raise FileNotFoundError(f"{item}: no finished preprocess/text.py output (manifest with merged files)")
            prefixes.extend(str(item / m["prefix"]) for m in merged)
        elif IndexedDataset.exists(str(item)):
            prefixes.append(str(item))
        else:
            raise FileNotFoundError(f"{item}: neither an indexed dataset prefix ({item}.bin/.idx) nor a directory")
    return prefixes


def merged_manifest(prefix: str | Path) -> tuple[Path, dict] | None:
    """(path, contents) of the `preprocess/text.py` manifest that merged `prefix` (None for a bare prefix)."""
    prefix = Path(prefix)
    for path in manifest_paths(prefix.parent):
        manifest = json.loads(path.read_text())
        if (manifest.get("merged") or {}).get("prefix") == prefix.name:
            return path, manifest
    return None


def recorded_tokenizer(prefix: str | Path) -> str | None:
    """The tokenizer fingerprint `preprocess/text.py` recorded for a merged dataset (None without a manifest)."""
    found = merged_manifest(prefix)
    return found[1]["fingerprints"].get("tokenizer") if found else None


def open_checked(prefix: str, verify_checksums: bool = False) -> IndexedDataset:
    """Open `prefix`.bin/.idx after checking them against the manifest (sizes; sha256 on request) and each other.

    The `.idx` must describe exactly the bytes of the `.bin`: every sequence starts where the previous one
    ends and the last ends at the file's end, so a truncated or mismatched pair, or one damaged length in
    the middle of the index (windows would run into the next documents), fails here naming the file."""
    found = merged_manifest(prefix)
    for entry in (found[1] if found else {}).get("merged", {}).get("files", []):
        check_file(Path(prefix).parent / entry["name"], entry, verify_checksums)
    try:
        dataset = IndexedDataset(prefix)
    except Exception as err:  # numpy / struct errors on a damaged index
        raise ShardError(f"{prefix}.idx: not a readable indexed-dataset index: {err}") from None
    index = dataset.index
    # every sequence must start where the previous one ends (in bytes): one vectorised pass over the index
    ends = index.sequence_pointers + index.sequence_lengths.astype(np.int64) * index.dtype_size
    bad = np.flatnonzero(index.sequence_pointers != np.concatenate([[0], ends[:-1]]))
    if bad.size:
        i = int(bad[0])
        before = f"sequence {i - 1} ends at byte {int(ends[i - 1])}" if i else "the first must start at byte 0"
        raise ShardError(
            f"{prefix}.idx: sequence {i} starts at byte {int(index.sequence_pointers[i])}, but {before} "
            f"(a damaged length or pointer near sequence {i}; re-run preprocess/text.py or restore the file)"
        )
    end = int(ends[-1]) if len(dataset) else 0
    size = os.path.getsize(f"{prefix}.bin")
    if end != size:
        raise ShardError(f"{prefix}.bin: {size} bytes, but {prefix}.idx describes {end} (the pair disagrees)")
    return dataset


class TextDataset(Dataset):
    """Windows `[CLS] tokens [SEP]` of at most `max_length` ids over one or more indexed datasets.

    `dataset[key]` takes an int or a `SampleKey` and returns {"input_ids": int64 array, "key": SampleKey};
    `collator()` masks them with `seed` (MLM draws are a function of (seed, key)) and `mlm_prob`.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: Tokenizer,
        max_length: int = 128,
        verify_checksums: bool = False,
        seed: int = 0,
        mlm_prob: float = 0.15,
    ):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] + one token + [SEP]), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed, self.mlm_prob = seed, mlm_prob
        self.prefixes = resolve_prefixes(paths)
        for prefix in self.prefixes:
            recorded = recorded_tokenizer(prefix)
            if recorded not in (None, tokenizer.fingerprint):
                raise ValueError(
                    f"{prefix} was tokenized with tokenizer {recorded}, but {tokenizer.path} is {tokenizer.fingerprint}"
                )
        self.datasets = [open_checked(prefix, verify_checksums) for prefix in self.prefixes]
        tables = [self._windows(ds.sequence_lengths, max_length - 2) for ds in self.datasets]
        self._dataset = np.concatenate([np.full(len(t[0]), j, dtype=np.int64) for j, t in enumerate(tables)])
        self._sequence, self._start, self._stop = (np.concatenate(cols) for cols in zip(*tables))

    @staticmethod
    def _windows(lengths: np.ndarray, body: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sequence, start, stop) of every window: ceil(n / body) near-equal windows per sequence."""
        lengths = np.asarray(lengths, dtype=np.int64)
        counts = -(-lengths // body)
        sequence = np.repeat(np.arange(lengths.size), counts)
        n, k = lengths[sequence], counts[sequence]
        i = np.arange(sequence.size) - np.repeat(np.cumsum(counts) - counts, counts)
        return sequence, i * n // k, (i + 1) * n // k

    def __len__(self) -> int:
        return int(self._sequence.size)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key))
        if not 0 <= key.index < len(self):
            raise IndexError(f"sample {key.index} out of range for {len(self)} text windows in {self.prefixes}")
        i = key.index
        start, stop = int(self._start[i]), int(self._stop[i])
        j, sequence = int(self._dataset[i]), int(self._sequence[i])
        tokens = self.datasets[j].get(sequence, offset=start, length=stop - start)
        tok = self.tokenizer
        check_ids(tokens, tok.vocab_size, "token id", f"{self.prefixes[j]}.bin sequence {sequence}")
        input_ids = np.concatenate([[tok.cls_id], tokens.astype(np.int64), [tok.sep_id]])
        return {"input_ids": input_ids, "key": key}

    def collator(self) -> TextCollator:
        """Pads and MLM-masks this dataset's samples with its seed and masking probability."""
        return TextCollator(self.tokenizer, self.seed, self.mlm_prob)


class TextCollator:
    """Pads a list of `TextDataset` samples to the longest and applies (whole-word) MLM masking.

    The batch has `input_ids`, `input_ids_masked`, `attention_mask` (1 = token, 0 = pad) and `mlm_labels`
    (-100 where not masked), all (B, L) int64 tensors.
    """

    def __init__(self, tokenizer: Tokenizer, seed: int, mlm_prob: float = 0.15, whole_word: bool = True):
        self.tokenizer = tokenizer
        self.seed = seed
        self.mlm_prob = mlm_prob
        self.whole_word = whole_word

    def mask(self, input_ids: np.ndarray, key: SampleKey) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        return mask_tokens(
            input_ids,
            tok.word_starts(input_ids) if self.whole_word else None,
            mask_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            special_ids=tok.special_ids,
            rng=sample_rng(self.seed, key),
            mlm_prob=self.mlm_prob,
            whole_word=self.whole_word,
        )

    def __call__(self, samples: Sequence[dict[str, Any]]) -> Batch:
        return Batch(**self.padded(samples))

    def padded(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The text inputs of a batch (also those of an image-text batch)."""
        length = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": np.full((len(samples), length), self.tokenizer.pad_id, dtype=np.int64),
            "input_ids_masked": np.full((len(samples), length), self.tokenizer.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(samples), length), dtype=np.int64),
            "mlm_labels": np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64),
        }
        for row, sample in enumerate(samples):
            ids = sample["input_ids"]
            masked, labels = self.mask(ids, sample["key"])
            n = len(ids)
            batch["input_ids"][row, :n] = ids
            batch["input_ids_masked"][row, :n] = masked
            batch["attention_mask"][row, :n] = 1
            batch["mlm_labels"][row, :n] = labels
        return {name: torch.from_numpy(array) for name, array in batch.items()}

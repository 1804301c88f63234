"""What a checkpoint records for its export beside DeepSpeed's files, readable without unpickling anything.

`processing.json` and the tokenizer copy (`flava_ds.data.processing`) say how raw inputs become model inputs;
`training.json` holds the step and the data sources (each shard directory's sample count and the fingerprints its
manifests record). `checkpoint.export` carries both into the export, where `tools/convert_checkpoint.py to-hf`
turns them into a transformers tokenizer, image processor and model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flava_ds.data.processing import PROCESSING, copy_processing, processing_record, tokenizer_copy
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.shard_format import read_manifests
from flava_ds.train.config import DataSection

TRAINING = "training.json"


def data_sources(data: DataSection) -> dict[str, Any]:
    """Each trained stream's ratio and shard directories, with their sample counts and manifest fingerprints."""
    sources: dict[str, Any] = {}
    for stream, ratio in data.active_ratios().items():
        shards = []
        for path in getattr(data, stream).paths:
            manifests = read_manifests(Path(path))
            samples = sum(m.get("samples_written", 0) for m in manifests)
            shards.append({"path": path, "samples": samples, "fingerprints": manifests[0].get("fingerprints", {})})
        sources[stream] = {"ratio": ratio, "shards": shards}
    return sources


def run_sidecars(
    tokenizer: Tokenizer | None, image_size: int, step: int, sources: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    """(JSON sidecars, files to copy) of a checkpoint at `step`, for `checkpoint.save`."""
    json_files = {PROCESSING: processing_record(tokenizer, image_size), TRAINING: {"step": step, "data": sources}}
    return json_files, tokenizer_copy(tokenizer)


def read_training(directory: Path) -> dict[str, Any] | None:
    """`directory`'s training.json, None where there is none."""
    path = Path(directory) / TRAINING
    return json.loads(path.read_text()) if path.is_file() else None


def carry_to_export(checkpoint: Path, export: Path) -> None:
    """The checkpoint's processing record and training.json into its export (those it has: older ones have none)."""
    copy_processing(checkpoint, export)
    if (checkpoint / TRAINING).is_file():
        shutil.copyfile(checkpoint / TRAINING, export / TRAINING)

"""The image half of the shard format, written by both image converters (``preprocess/images.py``, and
``preprocess/pairs.py``, which adds the text columns), and the driver they share.

Every row stores the image once at S x S (short side resized to S, centre crop, JPEG bytes) and
the dVAE token grid of its *codebook view* (the decoded S x S JPEG reduced 2x, pixels in [0, 1]) for
the image and for its horizontal flip, each (S/16)^2 uint16 tokens, row-major. Training crops at
offsets that are multiples of 16 px, so slices of these grids are the MIM targets and the dVAE never
runs during training. Tokens come from the decoded JPEG, i.e. exactly the pixels training sees.

Workers prepare the samples (``preprocess/image_decoding.py``); the dVAE runs batched in the main process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from flava_ds.shard_format import CODEBOOK_TOKENS, CODEBOOK_TOKENS_FLIPPED, ID, IMAGE
from preprocess.common import add_settings_flags, check_common_args, settings_from_args, worker_pool
from preprocess.image_decoding import ImageSettings, SkipSample
from preprocess.sharded_run import ShardedRun
from preprocess.shards import ShardInput, ShardResult, ShardTask

ROWS_PER_RECORD_BATCH = 256  # fixed, so output bytes do not depend on the dVAE batch size


class CodebookEncoder:
    """Runs the frozen dVAE over codebook views in batches; returns (tokens, tokens of the flipped view)."""

    def __init__(self, spec: str, device: str, batch_size: int):
        import torch

        from flava_ds.model.codebook import load_codebook

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine")
        self.torch = torch
        self.codebook = load_codebook(spec).to(device)
        self.device = device
        self.batch_size = batch_size
        self.fingerprint = self.codebook.fingerprint
        if self.codebook.config.vocab_size > 65536:
            raise ValueError(f"codebook vocab {self.codebook.config.vocab_size} does not fit uint16 tokens")

    def encode(self, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """views: uint8 (h, w, 3) each -> two uint16 arrays (n, (h/8)*(w/8))."""
        torch = self.torch
        plain, flipped = [], []
        for start in range(0, len(views), self.batch_size):
            chunk = np.stack(views[start : start + self.batch_size])
            x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            tokens = self.codebook.get_codebook_indices(torch.cat([x, x.flip(3)]))
            tokens = tokens.flatten(1).to(torch.int32).cpu().numpy().astype(np.uint16)
            plain.append(tokens[: len(chunk)])
            flipped.append(tokens[len(chunk) :])
        return np.concatenate(plain), np.concatenate(flipped)


def image_schema(settings: ImageSettings, extra: Sequence[tuple[str, pa.DataType]], metadata: dict) -> pa.Schema:
    """The image columns, then a converter's `extra` ones; the metadata records the image size and identities."""
    tokens = pa.list_(pa.uint16(), settings.grid**2)
    fields = [
        (ID, pa.string()),
        (IMAGE, pa.binary()),
        (CODEBOOK_TOKENS, tokens),
        (CODEBOOK_TOKENS_FLIPPED, tokens),
        *extra,
    ]
    meta = {"image_size": str(settings.image_size), "grid": str(settings.grid), **metadata}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def _column(values: list, dtype: pa.DataType) -> pa.Array:
    """One column of a record batch; token grids are concatenated into one flat array first (fast)."""
    if pa.types.is_fixed_size_list(dtype):
        flat = pa.array(np.concatenate(values), dtype.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, dtype.list_size)
    return pa.array(values, dtype)


def write_image_shard(
    task: ShardTask,
    prepared: Iterator[dict | SkipSample],
    encoder: CodebookEncoder,
    schema: pa.Schema,
) -> ShardResult:
    """Consume prepared samples (in record order), add dVAE tokens in batches, write one Arrow IPC file.

    A prepared sample is a dict with the schema's columns except the token columns, plus ``view`` and optionally
    ``dropped`` (reasons of parts left out, counted in the manifest)."""
    result = ShardResult(samples=0)
    pending: list[dict] = []
    rows: list[dict] = []

    with pa.OSFile(str(task.tmp_path(".arrow")), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

        def tokenize_pending() -> None:
            tokens, flipped = encoder.encode([p.pop("view") for p in pending])
            for p, t, f in zip(pending, tokens, flipped):
                rows.append({**p, CODEBOOK_TOKENS: t, CODEBOOK_TOKENS_FLIPPED: f})
            task.progress(len(pending))
            pending.clear()

        def write_rows(final: bool) -> None:
            while len(rows) >= ROWS_PER_RECORD_BATCH or (final and rows):
                batch, rows[:] = rows[:ROWS_PER_RECORD_BATCH], rows[ROWS_PER_RECORD_BATCH:]
                columns = [_column([r[f.name] for r in batch], f.type) for f in schema]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                result.samples += len(batch)

        for sample in prepared:
            if isinstance(sample, SkipSample):
                result.skip(sample.reason, sample.detail)
                continue
            result.dropped.update(sample.pop("dropped", ()))
            pending.append(sample)
            if len(pending) >= encoder.batch_size:
                tokenize_pending()
                write_rows(final=False)
        if pending:
            tokenize_pending()
        write_rows(final=True)
    return result


def add_image_args(parser: argparse.ArgumentParser) -> None:
    """The image and dVAE flags both image converters take."""
    g = parser.add_argument_group("images and the dVAE codebook")
    g.add_argument("--codebook", required=True, help="FlavaImageCodebook directory, or random:SEED[:tiny]")
    add_settings_flags(g, ImageSettings)
    g.add_argument("--device", default="cpu", help="device for the dVAE (cpu, cuda, cuda:1, ...)")
    g.add_argument("--batch-size", type=int, default=64, help="dVAE batch size")


def check_image_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ImageSettings:
    """Validate the image and common flags before any worker starts; exits with a usage error."""
    try:
        check_common_args(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not 1 <= args.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {args.jpeg_quality}")
        return settings_from_args(ImageSettings, args)
    except ValueError as e:
        parser.error(str(e))


def run_image_conversion(
    args: argparse.Namespace,
    kind: str,
    inputs: Iterable[ShardInput],
    shard_rows: Sequence[int] | None,
    prepare: Callable[[tuple[int, Any]], dict | SkipSample],
    worker_init: Callable,
    worker_args: tuple,
    extra_columns: Sequence[tuple[str, pa.DataType]],
    fingerprints: dict[str, str],
) -> int:
    """Shared driver of the image converters: pool of `prepare` workers, batched dVAE, resumable shards.

    Callers hold ``output_lock(args)`` already, so a second converter stops before the codebook loads."""
    settings = settings_from_args(ImageSettings, args)
    # fork the workers before torch starts its thread pools
    with worker_pool(args.workers, worker_init, worker_args) as pool:
        encoder = CodebookEncoder(args.codebook, args.device, args.batch_size)
        fingerprints = {"codebook": encoder.fingerprint, **fingerprints}
        schema = image_schema(settings, extra_columns, {"kind": kind, **fingerprints})
        run = ShardedRun(args, kind, fingerprints, (".arrow",), resume_ignore=("device", "batch_size"))

        def convert(task: ShardTask) -> ShardResult:
            return write_image_shard(task, pool.imap(prepare, task.records, chunksize=4), encoder, schema)

        return run.run(inputs, convert, shard_rows)

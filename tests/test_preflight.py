"""Data that cannot fit the model is refused at start-up, naming the file and the field (docs/RELIABILITY.md
section 3): manifests against the model and run config (`flava_ds.train.preflight.check_data`), Arrow list
offsets and `.idx` pointers when the readers open them, and out-of-range ids per sample in image-text shards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flava_ds.data.arrow_dataset import ArrowShards, ShardError
from flava_ds.data.image_dataset import ImageAugment
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.text_dataset import TextDataset
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.data.tolerant import TolerantDataset
from flava_ds.train.config import ConfigError, RunConfig, model_config_of
from flava_ds.train.preflight import check_data
from tests.data_fixtures import CODEBOOK
from tests.launch import ROOT
from tests.train_fixtures import make_training_data, write_run_config

POSITIONS = 80  # the tiny preset's text.max_position_embeddings
IDX_HEADER = 9 + 8 + 1 + 8 + 8  # Megatron .idx: magic, version, dtype code, sequence count, document count


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("preflight_data"), num_pairs=16, num_docs=12)


@pytest.fixture(scope="module")
def long_captions(data) -> Path:
    """Image-text shards converted with --max-length 100, longer than the tiny text encoder's 80 positions."""
    from preprocess import pairs

    root = data["tokenizer"].parent
    output = root / "pairs_long"
    args = ["--input", str(root / "train.jsonl"), "--image-root", str(root), "--output", str(output)]
    args += ["--tokenizer", str(data["tokenizer"]), "--codebook", CODEBOOK, "--image-size", "80"]
    assert pairs.main([*args, "--max-length", "100", "--workers", "0", "--no-progress"]) == 0
    return output


def _check(tmp: Path, shards: dict[str, Path], **sections) -> None:
    config = RunConfig.load(write_run_config(tmp / "run.yaml", shards, **sections))
    check_data(config, model_config_of(config))


def _manifest(directory: Path) -> Path:
    return directory / "manifest.json"


def test_the_fixture_data_passes(data, tmp_path):
    _check(tmp_path, data, eval={"image_text": [str(data["heldout"])], "text": [str(data["text"])]})


def test_captions_longer_than_the_text_positions_are_refused_through_pretrain(data, long_captions, tmp_path):
    """(a) End to end: pretrain.py exits non-zero with one line naming the manifest and args.max_length, before
    DeepSpeed is imported (no traceback, no DeepSpeed log line)."""
    config = write_run_config(
        tmp_path / "run.yaml", {**data, "pairs": long_captions}, data={"kind_ratios": {"image_text": 1.0}}
    )
    command = [sys.executable, "flava_ds/pretrain.py", "--deepspeed_config", "ds_configs/zero0.json"]
    result = subprocess.run([*command, "--config", str(config)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    expected = (
        f"flava_ds: configuration error: {_manifest(long_captions)}: args.max_length=100 (captions up to 100 "
        f"tokens) exceeds the model's text.max_position_embeddings={POSITIONS}"
    )
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # DeepSpeed is imported only after the check: not even its accelerator detection logged, let alone a model build
    assert not re.search(r"deepspeed|accelerator", result.stderr + result.stdout, re.I), result.stderr[-3000:]


def test_eval_shards_are_compared_too(data, long_captions, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{_manifest(long_captions)}: args\.max_length=100"):
        _check(tmp_path, data, eval={"image_text": [str(long_captions)]})


def test_text_max_length_beyond_the_positions_is_refused(data, tmp_path):
    """(b)"""
    with pytest.raises(ConfigError, match=rf"^data\.text_max_length=100 exceeds .*max_position_embeddings={POSITIONS}"):
        _check(tmp_path, data, data={"text_max_length": 100})


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused(data, tmp_path):
    """(c) The fixture tokenizer has 121 tokens."""
    with pytest.raises(ConfigError, match=rf"^data\.tokenizer {data['tokenizer']}: vocab_size=121 exceeds .*=100"):
        _check(tmp_path, data, model={"preset": "tiny", "overrides": {"text": {"vocab_size": 100}}})


@pytest.mark.parametrize("task", ["image_text", "text"])
def test_shards_made_with_another_tokenizer_are_refused(data, tmp_path, task):
    """(c) Same vocabulary, different file: the fingerprint (sha256 of the file, as the preprocessors record it)
    differs from the one in the manifest."""
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(json.dumps(json.loads(data["tokenizer"].read_text()), indent=4))
    directory = data["pairs"] if task == "image_text" else data["text"]
    fingerprint = Tokenizer.from_file(other).fingerprint
    with pytest.raises(ConfigError, match=rf"^{_manifest(directory)}: fingerprints\.tokenizer=\w+ .*is {fingerprint}"):
        _check(tmp_path, data, data={"tokenizer": str(other), "kind_ratios": {task: 1.0}})


@pytest.mark.parametrize("task", ["image_text", "image"])
def test_a_codebook_of_another_size_is_refused(data, tmp_path, task):
    """(d) The shards were made with random:0:tiny (64 codes)."""
    directory = data["pairs"] if task == "image_text" else data["images"]
    model = {"preset": "tiny", "overrides": {"image": {"codebook_vocab_size": 128}}}
    with pytest.raises(ConfigError, match=rf"^{_manifest(directory)}: args\.codebook={CODEBOOK} has 64 codes.*=128"):
        _check(tmp_path, data, model=model, data={"kind_ratios": {task: 1.0}})


def test_stored_images_smaller_than_the_crop_are_refused(data, tmp_path):
    model = {"preset": "tiny", "overrides": {"image": {"image_size": 96}}}
    with pytest.raises(ConfigError, match=rf"^{_manifest(data['pairs'])}: args\.image_size=80 px .*96 px crop"):
        _check(tmp_path, data, model=model)


def test_a_patch_size_other_than_the_token_grid_is_refused(data, tmp_path):
    model = {"preset": "tiny", "overrides": {"image": {"patch_size": 8}}}
    with pytest.raises(ConfigError, match=r"^model image\.patch_size=8, but the shards store one codebook token"):
        _check(tmp_path, data, model=model)


def test_older_manifests_skip_the_fields_they_do_not_record(data, long_captions, tmp_path):
    """Shards whose manifest predates args.max_length / codebook / image_size and the tokenizer fingerprint."""
    old = tmp_path / "old"
    shutil.copytree(long_captions, old)
    manifest = json.loads(_manifest(old).read_text())
    for field in ("max_length", "codebook", "image_size"):
        del manifest["args"][field]
    manifest["fingerprints"].pop("tokenizer")
    _manifest(old).write_text(json.dumps(manifest))
    model = {"preset": "tiny", "overrides": {"image": {"codebook_vocab_size": 128}}}
    _check(tmp_path, {**data, "pairs": old}, model=model, data={"kind_ratios": {"image_text": 1.0}})


def _rewrite_column(shard: Path, name: str, rebuild) -> None:
    """Rewrite `shard` with pyarrow's IPC writer, column `name` replaced by `rebuild(column)` in every batch.

    Buffers keep their sizes, so the file keeps its size and passes the manifest's size check."""
    reader = pa.ipc.open_file(pa.memory_map(str(shard)))
    batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    batches = [
        pa.RecordBatch.from_arrays(
            [rebuild(c) if n == name else c for n, c in zip(b.schema.names, b.columns)], schema=b.schema
        )
        for b in batches
    ]
    size, tmp = shard.stat().st_size, shard.with_name("rewritten.tmp")
    with pa.ipc.new_file(str(tmp), reader.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    tmp.replace(shard)  # never truncate a file that is memory-mapped
    assert shard.stat().st_size == size


def _shifted_offsets(column: pa.Array, row: int, shift: int) -> pa.Array:
    """`column` with the offset ending `row` moved by `shift`: the row runs past (or before) its own values."""
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32).copy()
    offsets[row + 1] += shift
    buffers = [None, pa.py_buffer(offsets.tobytes()), *column.buffers()[2:]]
    children = [column.values] if pa.types.is_list(column.type) else None
    return pa.Array.from_buffers(column.type, len(column), buffers[: 2 if children else 3], children=children)


@pytest.mark.parametrize("column", ["input_ids", "image"])
def test_a_damaged_list_offset_is_refused_at_open(data, tmp_path, column):
    """(e) The offset after row 4 of the shard points far beyond the stored values."""
    damaged = tmp_path / "pairs"
    shutil.copytree(data["pairs"], damaged)
    shard = damaged / "shard-000000.arrow"
    _rewrite_column(shard, column, lambda c: _shifted_offsets(c, 4, 1_000_000))
    with pytest.raises(ShardError, match=rf"^{shard}: column '{column}' row 4: offsets \d+\.\.\d+ outside the"):
        ArrowShards(damaged)


def test_a_caption_longer_than_the_manifest_max_length_is_refused_at_open(data, tmp_path):
    """(e) Offsets in bounds, but a row longer than the converter's --max-length: the index and data disagree."""
    damaged = tmp_path / "pairs"
    shutil.copytree(data["pairs"], damaged)
    manifest = json.loads(_manifest(damaged).read_text())
    manifest["args"]["max_length"] = 5
    _manifest(damaged).write_text(json.dumps(manifest))
    with pytest.raises(
        ShardError, match=r"shard-000000\.arrow: column 'input_ids' row 0 \(entry 0\): \d+ entries, more than"
    ):
        ArrowShards(damaged)


def _flip_length(idx: Path, sequence: int) -> None:
    count = int(np.fromfile(idx, dtype="<u8", count=1, offset=9 + 8 + 1)[0])
    lengths = np.memmap(idx, dtype="<i4", mode="r+", offset=IDX_HEADER, shape=(count,))
    lengths[sequence] ^= 1
    lengths.flush()


def test_one_flipped_sequence_length_in_the_middle_of_an_idx_is_refused_at_open(data, tmp_path):
    """(f) Same file sizes (the manifest and the last-sequence check pass); every pointer is checked."""
    damaged = tmp_path / "text"
    shutil.copytree(data["text"], damaged)
    _flip_length(damaged / "text.idx", 5)
    tokenizer = Tokenizer.from_file(data["tokenizer"])
    with pytest.raises(ShardError, match=rf"^{damaged / 'text'}\.idx: sequence 6 starts at byte \d+, but sequence 5"):
        TextDataset(damaged, tokenizer, max_length=32)


def _tolerant_pairs(directory: Path, tokenizer: Path) -> TolerantDataset:
    tok = Tokenizer.from_file(tokenizer)
    dataset = ImageTextDataset(directory, tok, ImageAugment(crop_size=64), itm_negative_prob=0.0)  # own captions only
    return TolerantDataset(dataset, f"image_text {directory}")


def _set_values(column: pa.Array, row: int, value: int) -> pa.Array:
    """`column` with the first value of `row` set to `value` (fixed-size or variable lists; in a list of token
    lists, the first token of the row's first one)."""
    if pa.types.is_list(column.values.type):
        inner = _set_values(column.values, column.offsets[row].as_py(), value)
        return pa.ListArray.from_arrays(column.offsets, inner)
    values = column.values.to_numpy().copy()
    start = row * column.type.list_size if pa.types.is_fixed_size_list(column.type) else column.offsets[row].as_py()
    values[start] = value
    children = pa.array(values, type=column.values.type)
    if pa.types.is_fixed_size_list(column.type):
        return pa.FixedSizeListArray.from_arrays(children, column.type.list_size)
    return pa.ListArray.from_arrays(column.offsets, children)


@pytest.mark.parametrize(
    ("column", "value", "what"),
    [("input_ids", 500, r"caption token id 500 out of range \[0, 121\)"),
     ("codebook_tokens", 9000, r"codebook token 9000 out of range \[0, 64\)")],
)  # fmt: skip
def test_out_of_range_ids_in_an_image_text_shard_are_replaced_and_named(data, tmp_path, caplog, column, value, what):
    """Row 1 of the shard holds an id beyond the tokenizer (121) / the codebook (64): the sample is replaced
    by the next one and counted, the log names the shard file and the row."""
    damaged = tmp_path / "pairs"
    shutil.copytree(data["pairs"], damaged)
    shard = damaged / "shard-000000.arrow"
    _rewrite_column(shard, column, lambda c: _set_values(c, 1, value))
    dataset = _tolerant_pairs(damaged, data["tokenizer"])
    sample = dataset[1]
    assert sample["bad_samples"] == 1 and sample["key"].index == 2
    assert "bad_samples" not in dataset[0]
    assert any(re.search(rf"{re.escape(str(shard))} row 1: {what}", r.getMessage()) for r in caplog.records)

"""Damaged data: shards refused at start-up naming the file, undecodable samples replaced and counted, and a real
2-rank run stopped once too many samples failed. What each test proves is listed in docs/RELIABILITY.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.launch import launch_pretrain
from tests.train_fixtures import write_run_config


def _streams(data: dict[str, Path], **overrides):
    """Build a run's data streams in-process: the start-up checks, without a model or processes."""
    from flava_ds.data.tokenizer import Tokenizer
    from flava_ds.train.config import DataSection, StreamConfig
    from flava_ds.train.streams import TrainStreams

    section = DataSection(
        tokenizer=str(data["tokenizer"]),
        image_text=StreamConfig([str(data["pairs"])]),
        text=StreamConfig([str(data["text"])]),
        kind_ratios={"image_text": 1.0, "text": 1.0},
        num_workers=0,
        text_max_length=32,
        **overrides,
    )
    return TrainStreams(section, Tokenizer.from_file(section.tokenizer), 64, 2)


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_files_are_refused_at_startup_naming_the_file(training_data, tmp_path):
    """Truncated shards fail on the manifest size; same-size corruption fails with data.verify_checksums; a
    `.bin`/`.idx` pair that disagrees (or an unreadable index) fails even without a manifest."""
    from flava_ds.data.arrow_dataset import ShardError

    pairs, text = tmp_path / "pairs", tmp_path / "text"
    shutil.copytree(training_data["pairs"], pairs)
    shutil.copytree(training_data["text"], text)
    damaged = {**training_data, "pairs": pairs, "text": text}
    shard = sorted(pairs.glob("*.arrow"))[1]

    _flip_byte(shard, shard.stat().st_size // 2)
    _flip_byte(text / "text.bin", 7)
    _streams(damaged)  # same sizes: only the checksums can tell
    with pytest.raises(ShardError, match=rf"{shard}: sha256 differs"):
        _streams(damaged, verify_checksums=True)
    shutil.copy(training_data["pairs"] / shard.name, shard)
    with pytest.raises(ShardError, match=r"text\.bin: sha256 differs"):
        _streams(damaged, verify_checksums=True)

    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=rf"{shard}: \d+ bytes, the manifest records"):
        _streams(damaged)

    bare = tmp_path / "bare"
    bare.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(training_data["text"] / f"text{suffix}", bare / f"text{suffix}")
    (bare / "text.bin").write_bytes((bare / "text.bin").read_bytes()[:-2])
    bare_data = {**training_data, "text": bare / "text"}
    with pytest.raises(ShardError, match=r"text\.bin: \d+ bytes, but .*text\.idx describes \d+ \(the pair disagrees\)"):
        _streams(bare_data)
    (bare / "text.idx").write_bytes(b"not an index at all")
    with pytest.raises(ShardError, match=r"text\.idx: not a readable indexed-dataset index"):
        _streams(bare_data)


def _corrupt_images(source: Path, target: Path, rows: list[int]) -> None:
    """Copy a pair shard directory and break the JPEG header of `rows` in place (file sizes stay the same)."""
    from flava_ds.data.arrow_dataset import ArrowShards

    shutil.copytree(source, target)
    shards = ArrowShards(target)
    jpegs = [shards.row(row, ("image",))["image"] for row in rows]
    for file in shards.files:
        raw = file.read_bytes()
        for jpeg in jpegs:
            if (at := raw.find(jpeg)) >= 0:
                raw = raw[:at] + bytes(16) + raw[at + 16 :]
        file.write_bytes(raw)


def test_undecodable_sample_is_replaced_deterministically_and_counted(training_data, tmp_path):
    """A sample whose image does not decode, or whose stored token ids lie beyond the vocabulary, is served as the
    next index (same epoch) with bad_samples = 1."""
    from flava_ds.data.sampler import SampleKey

    _corrupt_images(training_data["pairs"], tmp_path / "pairs", [3])
    shutil.copytree(training_data["text"], tmp_path / "text")
    raw = bytearray((tmp_path / "text" / "text.bin").read_bytes())
    raw[:2] = b"\xff\xff"  # the first token of document 0 becomes id 65535 (uint16), the vocabulary has 200
    (tmp_path / "text" / "text.bin").write_bytes(bytes(raw))
    streams = _streams({**training_data, "pairs": tmp_path / "pairs", "text": tmp_path / "text"}).streams
    text = streams["text"].dataset
    assert text[SampleKey(0, 1)]["bad_samples"] == 1
    assert text[SampleKey(0, 1)]["key"] == SampleKey(1, 1) and (text[SampleKey(0, 1)]["input_ids"] < 200).all()

    stream = streams["image_text"]
    replaced = stream.dataset[SampleKey(3, 2)]
    following = stream.dataset[SampleKey(4, 2)]
    assert replaced["bad_samples"] == 1 and "bad_samples" not in following
    assert replaced["key"] == SampleKey(4, 2) and torch.equal(replaced["pixel_values"], following["pixel_values"])
    batch = stream.collate([replaced, following])
    assert batch.bad_samples == 1


def test_bad_samples_are_logged_and_stop_the_run_over_the_threshold(training_data, zero2_config, tmp_path):
    """2 of 36 image-text samples do not decode: training goes on (TensorBoard data/bad_samples counts them) until
    data.max_bad_sample_fraction = 0.02 is checked (after 50 samples) and stops the run with a clear message."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _corrupt_images(training_data["pairs"], tmp_path / "pairs", [3, 10])
    tb = tmp_path / "tb"
    config = write_run_config(
        tmp_path / "run.yaml",
        {**training_data, "pairs": tmp_path / "pairs"},
        data={"kind_ratios": {"image_text": 1.0}, "max_bad_sample_fraction": 0.02},
        train={"steps": 40, "log_interval": 1},
        logging={"tensorboard_dir": str(tb)},
    )
    result = launch_pretrain(2, "--deepspeed_config", str(zero2_config), "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "samples failed to decode by step 13 (more than data.max_bad_sample_fraction=0.02)" in output, output[-3000:]
    events = EventAccumulator(str(tb))
    events.Reload()
    counts = [e.value for e in events.Scalars("data/bad_samples")]
    assert counts[0] == 0 and counts[-1] >= 2 and len(counts) == 12

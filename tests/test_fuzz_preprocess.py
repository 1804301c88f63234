"""Fuzzing the converters' input side (hypothesis): random and mutated caption files, text corpora and image
bytes never crash `preprocess.pairs` / `preprocess.text`, and every input is accounted for in the manifest
(written + skipped == inputs, counted independently from the raw bytes). Example counts are kept small."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from preprocess import pairs, text
from preprocess.image_decoding import ImageSettings, SkipSample, load_square_image
from preprocess.readers import InputError
from tests.data_fixtures import CODEBOOK, make_tokenizer, random_image

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    random_image(np.random.default_rng(0), *size).save(buffer, fmt)
    return buffer.getvalue()


GOOD_CAPTION = "a dog runs on the grass"
SEEDS = {"good.jpg": _encoded("JPEG"), "good.png": _encoded("PNG"), "good.gif": _encoded("GIF")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("fuzz_tok"))


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few bytes overwritten, inserted or deleted, and maybe truncated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


image_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(sorted(SEEDS)).flatmap(lambda name: mutated(SEEDS[name])),
)


@given(image_bytes)
@settings(max_examples=100, deadline=None)
def test_image_decoder_never_raises_anything_but_a_skip(data):
    """Any bytes either become an S x S JPEG with its S/2 codebook view, or a SkipSample with a reason."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.img"
        path.write_bytes(data)
        try:
            jpeg, view = load_square_image(path, ImageSettings(image_size=32, max_pixels=512 * 512))
        except SkipSample as skip:
            assert skip.reason in ("corrupt_image", "truncated_image", "too_small", "too_large")
            return
    assert Image.open(io.BytesIO(jpeg)).size == (32, 32) and view.shape == (16, 16, 3)


def _records(raw: bytes) -> int:
    """Input records as the readers define them: non-blank lines."""
    return sum(1 for line in raw.split(b"\n") if line.strip())


def _usable(line: bytes) -> bool:
    """A line the converter must store: an existing image with a caption of more than 3 words."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("image") in SEEDS and record.get("caption") == GOOD_CAPTION


@st.composite
def caption_file(draw) -> tuple[bytes, dict[str, bytes]]:
    """JSONL bytes of valid, mutated and garbage lines, plus the image files they name."""
    files = dict(SEEDS)
    lines = []
    for i in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["good", "mutated_line", "garbage", "bad_image", "odd_fields"]))
        image = draw(st.sampled_from([*sorted(SEEDS), "missing.jpg"]))
        caption = draw(st.sampled_from([GOOD_CAPTION, "red car", "", "  "]))
        if kind == "bad_image":
            image = f"fuzz{i}.img"
            files[image] = draw(image_bytes)
        record = {"image": image, "caption": caption}
        if kind == "odd_fields":
            record = {"image": draw(st.one_of(st.none(), st.integers(), st.text(max_size=5))), "caption": None}
            record["caption"] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=30), st.lists(st.none())))
        line = json.dumps(record).encode()
        if kind == "mutated_line":
            line = draw(mutated(line))
        elif kind == "garbage":
            line = draw(st.binary(max_size=60))
        lines.append(line)
    return b"\n".join(lines), files


@given(caption_file())
@FUZZ
def test_pairs_converter_survives_fuzzed_inputs_and_counts_every_record(tokenizer, case):
    raw, files = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pairs.jsonl").write_bytes(raw)
        for name, data in files.items():
            (root / name).write_bytes(data)
        out = root / "out"
        args = ["--input", str(root / "pairs.jsonl"), "--image-root", str(root), "--output", str(out)]
        args += ["--tokenizer", str(tokenizer), "--codebook", CODEBOOK, "--image-size", "32", "--shard-size", "4"]
        args += ["--workers", "0", "--no-progress", "--max-skip-fraction", "1", "--max-pixels", str(512 * 512)]
        try:
            assert pairs.main(args) == 0
        except SystemExit as refused:  # the start-up probe: no readable record with an existing image
            assert refused.code == 2 and not (out / "manifest.json").exists()
            assert not any(_usable(line) for line in raw.split(b"\n"))
            return
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["inputs_seen"] == _records(raw)
        assert manifest["samples_written"] + sum(manifest["skipped"].values()) == manifest["inputs_seen"]
        files = [out / f["name"] for s in manifest["shards"] for f in s["files"]]
        assert sum(pa.ipc.open_file(str(f)).read_all().num_rows for f in files) == manifest["samples_written"]


@st.composite
def corpus_file(draw) -> tuple[str, bytes]:
    """A JSONL or plain-text corpus of valid, mutated and random lines."""
    suffix = draw(st.sampled_from([".jsonl", ".txt"]))
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["good", "mutated", "random", "blank", "odd"]))
        doc = draw(st.sampled_from(["the cat runs", "a b c d e f", "\u00e9t\u00e9 \u4e2d\u6587 text"]))
        line = json.dumps({"text": doc}).encode() if suffix == ".jsonl" else doc.encode()
        if kind == "mutated":
            line = draw(mutated(line))
        elif kind == "random":
            line = draw(st.binary(max_size=40))
        elif kind == "blank":
            line = b"   "
        elif kind == "odd" and suffix == ".jsonl":
            line = json.dumps({"text": draw(st.one_of(st.none(), st.integers(), st.lists(st.integers())))}).encode()
        lines.append(line)
    return suffix, b"\n".join(lines)


def _documents(suffix: str, raw: bytes) -> int:
    """Documents as preprocess.text defines them: JSON lines, or runs of non-blank lines in plain text."""
    if suffix == ".jsonl":
        return _records(raw)
    blank = [not line.decode("utf-8", "surrogateescape").strip() for line in raw.split(b"\n")]
    return sum(1 for i, b in enumerate(blank) if not b and (i == 0 or blank[i - 1]))


@given(corpus_file())
@settings(max_examples=60, deadline=None)
def test_text_converter_survives_fuzzed_inputs_and_counts_every_document(tokenizer, case):
    suffix, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / f"corpus{suffix}"
        source.write_bytes(raw)
        out = root / "out"
        args = ["--input", str(source), "--tokenizer", str(tokenizer), "--output", str(out), "--shard-size", "4"]
        try:
            text.check_inputs([str(source)], "text")
        except InputError:  # bytes that look like another format (magic numbers) or lack the field: refused
            with pytest.raises(SystemExit, match="2"):
                text.main([*args, "--workers", "0", "--no-progress", "--max-skip-fraction", "1"])
            assert not (out / "manifest.json").exists()
            return
        assert text.main([*args, "--workers", "0", "--no-progress", "--max-skip-fraction", "1"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["inputs_seen"] == _documents(suffix, raw)
        assert manifest["samples_written"] + sum(manifest["skipped"].values()) == manifest["inputs_seen"]
        assert manifest["merged"]["documents"] == manifest["samples_written"]

"""Converter guards against a second run, hostile paths and huge captions: the output lock (two converters
into one output, SIGKILL then re-run), reads confined to ``--image-root``, and ``--max-caption-bytes``."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flava_ds.data.tokenizer import Tokenizer
from flava_ds.shard_format import file_sha256
from preprocess import images, pairs, text
from tests.data_fixtures import (
    CODEBOOK,
    caption,
    make_pairs,
    make_tokenizer,
    pairs_args,
    random_image,
    write_images,
)
from tests.launch import ROOT
from tests.text_fixtures import write_jsonl

LOCK = ".lock-manifest.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    make_pairs(root, 12)
    return root


def read_rows(directory: Path, columns: list[str]) -> list[dict]:
    files = sorted(directory.glob("shard-*.arrow"))
    return [r for f in files for r in pa.ipc.open_file(str(f)).read_all().select(columns).to_pylist()]


def complete_manifest(output: Path) -> dict:
    """The manifest, checked to be complete and to describe exactly the files on disk."""
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"]
    for f in (f for s in manifest["shards"] for f in s["files"]):
        path = output / f["name"]
        assert (path.stat().st_size, file_sha256(path)) == (f["size"], f["sha256"]), f["name"]
    return manifest


def start_converter(root: Path, output: Path, log: Path) -> subprocess.Popen:
    """preprocess.pairs in its own process, with one pool worker (a child process that could hold the lock)."""
    cmd = [sys.executable, "-m", "preprocess.pairs", *pairs_args(root, output, "--workers", "1")]
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


def wait_until_locked(proc: subprocess.Popen, lock: Path) -> None:
    """Until `proc` holds the lock: the file names it (written after the flock), and a probe cannot take it."""
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if lock.exists() and lock.read_text().startswith(f"{proc.pid}@"):
            with open(lock) as probe, pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        time.sleep(0.01)
    pytest.fail(f"the converter (exit code {proc.poll()}) never held {lock}")


def test_a_second_converter_into_the_same_output_is_refused_and_the_first_completes(corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = start_converter(corpus, out, tmp_path / "first.log")
    try:
        wait_until_locked(first, out / LOCK)
        os.kill(first.pid, signal.SIGSTOP)  # mid-run, holding the lock, for as long as the second one takes
        try:
            cmd = [sys.executable, "-m", "preprocess.pairs", *pairs_args(corpus, out)]
            second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    finally:
        first.kill()
    assert second.returncode != 0
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr, second.stderr
    assert str(out) in second.stderr and f"{first.pid}@{socket.gethostname()}" in second.stderr
    assert "--output" in second.stderr  # what to do
    assert complete_manifest(out)["samples_written"] == 12


def test_a_lock_left_by_a_sigkilled_converter_does_not_block_the_rerun(corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = start_converter(corpus, out, tmp_path / "killed.log")
    try:
        wait_until_locked(proc, out / LOCK)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.time() + 60
        while proc.poll() is None and not children.read_text().split() and time.time() < deadline:
            time.sleep(0.01)  # kill once the pool worker exists: it must not keep the lock alive
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (out / LOCK).read_text().startswith(f"{proc.pid}@")  # the file stays; the flock went with the process
    assert pairs.main(pairs_args(corpus, out, "--workers", "1")) == 0
    assert complete_manifest(out)["samples_written"] == 12
    assert (out / LOCK).read_text() == f"{os.getpid()}@{socket.gethostname()}\n"


def test_every_converter_checks_the_lock_before_loading_anything_and_per_shard_index(corpus: Path, tmp_path: Path):
    """With this process holding the lock (its own open file, so flock excludes it as it would another
    process), each converter refuses even with a tokenizer or codebook that would fail to load; the machine of
    another --shard-index, whose manifest and lock differ, writes into the same directory meanwhile."""
    out = tmp_path / "out"
    out.mkdir()
    missing = str(tmp_path / "missing")
    text_args = ["--input", str(corpus / "pairs.jsonl"), "--output", str(out), "--tokenizer", missing]
    image_args = ["--input", str(corpus / "img"), "--output", str(out), "--codebook", missing, "--no-progress"]
    node1 = pairs_args(corpus, out, "--num-shards", "2", "--shard-index", "1", "--max-skip-fraction", "1")
    with open(out / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242@elsewhere\n")
        held.flush()
        for main, argv in (
            (pairs.main, pairs_args(corpus, out, "--tokenizer", missing)),
            (text.main, text_args),
            (images.main, image_args),
        ):
            with pytest.raises(SystemExit, match=r"another converter \(4242@elsewhere\)"):
                main(argv)
        assert pairs.main(node1) == 0
    assert json.loads((out / "manifest-node001-of-002.json").read_text())["complete"]
    assert not (out / "manifest.json").exists() and not (out / "classes.json").exists()


@pytest.fixture
def outside_root(tmp_path: Path) -> tuple[Path, Path]:
    """root/ (tokenizer, images, img/link.jpg a symlink to an image outside it) and that image, outside/real.jpg."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    make_tokenizer(root)
    write_images(root, 3)
    random_image(np.random.default_rng(5), 90, 90).save(outside / "real.jpg")
    (root / "img" / "link.jpg").symlink_to(outside / "real.jpg")
    return root, outside / "real.jpg"


ESCAPES = ("../outside/real.jpg", "img/../../outside/real.jpg")


def test_pairs_never_read_images_outside_the_image_root(outside_root: tuple[Path, Path]):
    root, real = outside_root
    rng = np.random.default_rng(0)
    inside = str(root / "img" / "0002.jpg")  # absolute, but inside the root: read
    names = [str(real), *ESCAPES, "img/0000.jpg", "img/sub/../0001.jpg", "img/link.jpg", inside]
    write_jsonl(root / "pairs.jsonl", [{"image": n, "caption": caption(rng)} for n in names])
    out = root / "out"
    assert pairs.main(pairs_args(root, out, "--max-skip-fraction", "1")) == 0
    manifest = complete_manifest(out)
    assert manifest["skipped"] == {"outside_image_root": 3}
    assert [r["id"] for r in read_rows(out, ["id"])] == [f"pairs.jsonl:{i}" for i in (4, 5, 6, 7)]


def test_image_list_paths_outside_the_image_root_are_skipped(outside_root: tuple[Path, Path]):
    root, real = outside_root
    names = [str(real), *ESCAPES, "img/0000.jpg", "img/link.jpg"]
    (root / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    out = root / "out"
    args = ["--input", str(root / "list.txt"), "--image-root", str(root), "--output", str(out)]
    args += ["--codebook", CODEBOOK, "--image-size", "64", "--workers", "0", "--no-progress"]
    assert images.main([*args, "--max-skip-fraction", "1"]) == 0
    manifest = complete_manifest(out)
    assert manifest["skipped"] == {"outside_image_root": 3}
    assert read_rows(out, ["id", "label"]) == [{"id": "img/0000.jpg", "label": 3}, {"id": "img/link.jpg", "label": 4}]


def test_a_huge_caption_is_skipped_before_it_reaches_the_tokenizer(corpus: Path, tmp_path: Path, monkeypatch):
    rng = np.random.default_rng(1)
    huge = " ".join(["dog"] * 2_500_000)  # 10 MB
    records = [{"image": f"img/{i:04d}.jpg", "caption": caption(rng)} for i in range(3)]
    records.insert(1, {"image": "img/0001.jpg", "caption": huge})
    write_jsonl(corpus / "huge.jsonl", records)
    encoded: list[int] = []  # lengths of the texts the tokenizer saw
    encode = Tokenizer.encode

    def recording_encode(self: Tokenizer, text: str, *args, **kwargs):
        encoded.append(len(text))
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", recording_encode)
    out = tmp_path / "out"
    assert pairs.main(pairs_args(corpus, out, "--max-skip-fraction", "1", inputs=("huge.jsonl",))) == 0
    manifest = complete_manifest(out)
    assert manifest["skipped"] == {"caption_too_long": 1} and manifest["samples_written"] == 3
    assert manifest["skip_examples"]["caption_too_long"] == ["huge.jsonl:2: 9999999 bytes > --max-caption-bytes 16384"]
    assert len(encoded) == 3 and max(encoded) < 100
    assert [r["captions"] for r in read_rows(out, ["captions"])] == [
        [r["caption"]] for r in records if r["caption"] != huge
    ]


def test_the_caption_limit_counts_utf8_bytes(corpus: Path, tmp_path: Path):
    captions = [
        "a dog runs on",
        "\u00e9t\u00e9 \u00e9t\u00e9 \u00e9t\u00e9 \u00e9t\u00e9",
    ]  # 13 bytes; 15 chars, 23 bytes
    write_jsonl(corpus / "utf8.jsonl", [{"image": "img/0000.jpg", "caption": c} for c in captions])
    out = tmp_path / "out"
    args = pairs_args(corpus, out, "--max-caption-bytes", "20", "--max-skip-fraction", "1", inputs=("utf8.jsonl",))
    assert pairs.main(args) == 0
    assert complete_manifest(out)["skipped"] == {"caption_too_long": 1}
    assert [r["captions"] for r in read_rows(out, ["captions"])] == [["a dog runs on"]]

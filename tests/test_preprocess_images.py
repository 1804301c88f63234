"""The image converters: shard format, dVAE tokens, hostile inputs, skip accounting, resume, node split."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from flava_ds.data.arrow_dataset import ArrowShards, ShardError
from flava_ds.data.image_dataset import ImageAugment, ImageDataset
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model.codebook import load_codebook
from preprocess import images, pairs
from preprocess.sharded_run import EXIT_TOO_MANY_SKIPS
from tests.data_fixtures import (
    CODEBOOK,
    make_pairs,
    make_tokenizer,
    pairs_args,
    random_image,
    write_hostile_jsonl,
    write_images,
)
from tests.launch import ROOT
from tests.text_fixtures import write_jsonl

PAIR_COLUMNS = ["id", "image", "codebook_tokens", "codebook_tokens_flipped", "captions", "input_ids"]
N_PAIRS = 20


def read_table(directory: Path) -> pa.Table:
    """All shards of a directory with plain pyarrow, in shard-name order."""
    files = sorted(directory.glob("shard-*.arrow"))
    return pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files])


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.glob("shard-*.arrow"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    make_pairs(root, N_PAIRS)
    return root


@pytest.fixture(scope="module")
def single_run(corpus: Path) -> Path:
    out = corpus / "out_single"
    assert pairs.main(pairs_args(corpus, out, "--workers", "2")) == 0
    return out


def codebook_tokens(images_u8: list[np.ndarray]) -> np.ndarray:
    """Independent recomputation: the tiny codebook on S/2 views given as uint8 (h, w, 3)."""
    x = torch.from_numpy(np.stack(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    return load_codebook(CODEBOOK).get_codebook_indices(x).flatten(1).numpy()


def test_plain_pyarrow_reads_the_documented_columns(corpus: Path, single_run: Path):
    table = read_table(single_run)
    assert table.column_names == PAIR_COLUMNS
    assert table.num_rows == N_PAIRS
    assert table.schema.field("codebook_tokens").type == pa.list_(pa.uint16(), 25)
    assert table.schema.field("input_ids").type.value_type.value_type == pa.int32()
    assert table.column("id").to_pylist() == [f"pairs.jsonl:{i}" for i in range(1, N_PAIRS + 1)]
    source = [json.loads(line) for line in (corpus / "pairs.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.from_file(corpus / "tokenizer.json")
    for row, src in zip(table.to_pylist(), source):
        assert row["captions"] == [src["caption"]]
        assert row["input_ids"] == [tokenizer.encode(src["caption"], 77)]
        stored = Image.open(io.BytesIO(row["image"]))
        assert stored.format == "JPEG" and stored.size == (80, 80)
        # independent short-side resize + centre crop of the original: closer than any other crop or mirror
        original = Image.open(corpus / src["image"]).convert("RGB")
        w, h = original.size
        scale = 80 / min(w, h)
        resized = np.asarray(original.resize((round(w * scale), round(h * scale)), Image.BICUBIC), np.float32)
        top, left = (resized.shape[0] - 80) // 2, (resized.shape[1] - 80) // 2
        pixels = np.asarray(stored, dtype=np.float32)
        error = np.abs(pixels - resized[top : top + 80, left : left + 80]).mean()
        others = [np.abs(pixels - resized[top : top + 80, left : left + 80][:, ::-1]).mean()]
        for dy, dx in ((0, 8), (0, -8), (8, 0), (-8, 0)):
            y, x = top + dy, left + dx
            if 0 <= y <= resized.shape[0] - 80 and 0 <= x <= resized.shape[1] - 80:
                others.append(np.abs(pixels - resized[y : y + 80, x : x + 80]).mean())
        assert error < 10 and error < 0.8 * min(others)


def test_stored_tokens_are_the_codebook_of_the_stored_image_and_its_flip(single_run: Path):
    table = read_table(single_run)
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()]
    views = [np.asarray(im.reduce(2)) for im in decoded]
    flipped_views = [np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT).reduce(2)) for im in decoded]
    stored = np.array(table.column("codebook_tokens").to_pylist())
    stored_flipped = np.array(table.column("codebook_tokens_flipped").to_pylist())
    np.testing.assert_array_equal(stored, codebook_tokens(views))
    np.testing.assert_array_equal(stored_flipped, codebook_tokens(flipped_views))
    assert not np.array_equal(stored, stored_flipped)


def test_manifest_records_files_counts_and_fingerprints(corpus: Path, single_run: Path):
    manifest = json.loads((single_run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["skip_check"]["passed"]
    assert manifest["inputs_seen"] == manifest["samples_written"] == N_PAIRS
    assert manifest["skipped"] == {}
    assert manifest["fingerprints"] == {
        "codebook": load_codebook(CODEBOOK).fingerprint,
        "tokenizer": Tokenizer.from_file(corpus / "tokenizer.json").fingerprint,
    }
    assert [s["first_record"] for s in manifest["shards"]] == [0, 8, 16]
    for shard in manifest["shards"]:
        (entry,) = shard["files"]
        assert (single_run / entry["name"]).stat().st_size == entry["size"]
    assert manifest["args"]["image_size"] == 80


def test_two_machines_together_equal_the_single_run(corpus: Path, single_run: Path):
    out = corpus / "out_nodes"
    for node in ("0", "1"):
        assert pairs.main(pairs_args(corpus, out, "--num-shards", "2", "--shard-index", node)) == 0
    assert sorted(p.name for p in out.glob("manifest*.json")) == [
        "manifest-node000-of-002.json",
        "manifest-node001-of-002.json",
    ]
    assert shard_bytes(out) == shard_bytes(single_run)
    node0 = json.loads((out / "manifest-node000-of-002.json").read_text())
    assert [s["index"] for s in node0["shards"]] == [0, 2]
    ids = ArrowShards(out).row
    half = corpus / "out_one_node"
    shutil.copytree(out, half)
    (half / "manifest-node001-of-002.json").unlink()
    with pytest.raises(ShardError, match=r"machines \[0\] present"):
        ArrowShards(half)
    assert sorted(ids(i, ["id"])["id"] for i in range(N_PAIRS)) == sorted(
        read_table(single_run).column("id").to_pylist()
    )


@pytest.fixture(scope="module")
def hostile(corpus: Path) -> tuple[Path, dict[str, int], int]:
    lines, expected = write_hostile_jsonl(corpus, np.random.default_rng(5))
    good = (corpus / "pairs.jsonl").read_bytes().splitlines(keepends=True)[:6]
    mixed = [line for pair in zip(lines, good + [b""] * len(lines)) for line in pair]
    (corpus / "hostile.jsonl").write_bytes(b"".join(mixed))
    return corpus, expected, len(good)


def test_hostile_inputs_are_skipped_and_counted_by_reason(hostile):
    corpus, expected, n_good = hostile
    out = corpus / "out_hostile"
    rc = pairs.main(pairs_args(corpus, out, "--max-skip-fraction", "1", inputs=("hostile.jsonl",)))
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == expected
    examples = manifest["skip_examples"]  # each reason names its input line (and file where there is one)
    assert {reason: len(found) for reason, found in examples.items()} == expected
    assert all(where.startswith("hostile.jsonl:") for found in examples.values() for where in found)
    assert "does_not_exist.jpg" in examples["missing_file"][0]
    assert manifest["samples_written"] == n_good
    assert manifest["inputs_seen"] == n_good + sum(expected.values())
    assert len(ArrowShards(out)) == n_good


def test_tsv_with_non_utf8_and_empty_captions(corpus: Path):
    lines = [
        b"image\tcaption",
        b"img/0001.jpg\ta dog runs on the grass",
        b"img/0002.jpg\tcaf\xe9 on a red table",
        b"img/0003.jpg\t",
        b"img/0006.jpg\tthe old boat near the river",
        b"img/0005.jpg",
    ]
    (corpus / "pairs.tsv").write_bytes(b"\n".join(lines) + b"\n")
    out = corpus / "out_tsv"
    assert pairs.main(pairs_args(corpus, out, "--max-skip-fraction", "1", inputs=("pairs.tsv",))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"caption_not_utf8": 1, "empty_caption": 1, "bad_record": 1}
    assert read_table(out).column("id").to_pylist() == ["pairs.tsv:2", "pairs.tsv:5"]


def test_parquet_input_with_configured_fields(corpus: Path):
    import pyarrow.parquet as pq

    source = [json.loads(line) for line in (corpus / "pairs.jsonl").read_text().splitlines()][:5]
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(5)],
            "img": [r["image"] for r in source],
            "text": [r["caption"] for r in source],
        }
    )
    pq.write_table(table, corpus / "pairs.parquet")
    out = corpus / "out_parquet"
    fields = ["--image-field", "img", "--caption-field", "text", "--id-field", "key"]
    assert pairs.main(pairs_args(corpus, out, *fields, inputs=("pairs.parquet",))) == 0
    stored = read_table(out)
    assert stored.column("id").to_pylist() == [f"k{i}" for i in range(5)]
    assert stored.column("captions").to_pylist() == [[r["caption"]] for r in source]


def test_resuming_with_different_settings_is_refused(corpus: Path, single_run: Path):
    with pytest.raises(SystemExit, match="image_size"):
        pairs.main(pairs_args(corpus, single_run, "--image-size", "64"))


def test_too_many_skips_exit_non_zero_after_writing_the_manifest(hostile):
    corpus, expected, _ = hostile
    out = corpus / "out_fail"
    rc = pairs.main(pairs_args(corpus, out, inputs=("hostile.jsonl",)))  # default --max-skip-fraction 0.01
    assert rc == EXIT_TOO_MANY_SKIPS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and not manifest["skip_check"]["passed"]
    assert manifest["skipped"] == expected


def test_english_only_without_langid_is_a_clear_error(corpus: Path):
    try:
        import langid  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="langid"):
            pairs.main(pairs_args(corpus, corpus / "out_en", "--english-only"))
    else:
        pytest.skip("langid is installed")


def test_english_only_counts_other_languages(corpus: Path, monkeypatch):
    """A stand-in `langid` (the real one is optional): captions mentioning 'river' count as French."""
    fake = types.SimpleNamespace(classify=lambda text: ("fr", 1.0) if "river" in text else ("en", 1.0))
    monkeypatch.setitem(sys.modules, "langid", fake)
    out = corpus / "out_english"
    assert pairs.main(pairs_args(corpus, out, "--english-only", "--max-skip-fraction", "1")) == 0
    source = [json.loads(line)["caption"] for line in (corpus / "pairs.jsonl").read_text().splitlines()]
    french = sum("river" in c for c in source)
    assert 0 < french < len(source)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"not_english": french}
    assert read_table(out).column("captions").to_pylist() == [[c] for c in source if "river" not in c]


def test_image_size_must_be_a_multiple_of_16(corpus: Path):
    with pytest.raises(SystemExit):
        pairs.main(pairs_args(corpus, corpus / "out_bad", "--image-size", "70"))


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path: Path):
    root = tmp_path / "kill"
    root.mkdir()
    make_tokenizer(root)
    # large PNGs make each shard slow enough to kill the job between shards
    names = write_images(root, 24, seed=3, sizes=((640, 480), (480, 640)))
    rng = np.random.default_rng(0)
    captions = [f"photo {i} of " + " ".join(rng.choice(["a", "b"], 4)) for i in range(len(names))]
    write_jsonl(root / "pairs.jsonl", [{"image": n, "caption": c} for n, c in zip(names, captions)])
    reference, killed = root / "reference", root / "killed"
    args = ["--shard-size", "3"]
    assert pairs.main(pairs_args(root, reference, *args)) == 0

    cmd = [sys.executable, "-m", "preprocess.pairs", *pairs_args(root, killed, *args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest_path = killed / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest_path.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest_path.read_text())
    assert not partial["complete"], "the converter finished before it could be killed"
    done = {s["files"][0]["name"] for s in partial["shards"]}
    inodes = {name: (killed / name).stat().st_ino for name in done}

    assert pairs.main(pairs_args(root, killed, *args)) == 0
    assert {name: (killed / name).stat().st_ino for name in done} == inodes  # finished shards kept
    assert shard_bytes(killed) == shard_bytes(reference)
    assert not list(killed.glob(".tmp-*"))
    a, b = ArrowShards(killed), ArrowShards(reference)
    assert [a.row(i, ["id"]) for i in range(len(a))] == [b.row(i, ["id"]) for i in range(len(b))]
    assert len(a) == 24
    # a recorded shard damaged later (wrong size) is redone, the others kept
    damaged = killed / "shard-000001.arrow"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    kept = (killed / "shard-000002.arrow").stat().st_ino
    assert pairs.main(pairs_args(root, killed, *args)) == 0
    assert shard_bytes(killed) == shard_bytes(reference)
    assert (killed / "shard-000002.arrow").stat().st_ino == kept


# ---- image-only corpora -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(7)
    for cls in ("zebra", "ant", "cat"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            random_image(rng, 90 + 10 * i, 100).save(root / "train" / cls / f"{cls}_{i}.jpg")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


def image_args(source: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--input",
        str(source),
        "--output",
        str(output),
        "--codebook",
        CODEBOOK,
        "--image-size",
        "64",
        "--shard-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        "--max-skip-fraction",
        "0.2",
        *extra,
    ]


def test_image_folders_to_shards_with_labels_and_classes(image_folders: Path):
    out = image_folders / "out"
    assert images.main(image_args(image_folders / "train", out)) == 0
    assert json.loads((out / "classes.json").read_text()) == {"ant": 0, "cat": 1, "zebra": 2}
    table = read_table(out)
    assert table.column_names == ["id", "image", "codebook_tokens", "codebook_tokens_flipped", "label"]
    rows = table.select(["id", "label"]).to_pylist()
    assert rows == [
        {"id": f"{cls}/{cls}_{i}.jpg", "label": label}
        for label, cls in enumerate(["ant", "cat", "zebra"])
        for i in range(3)
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"corrupt_image": 1} and manifest["inputs_seen"] == 10
    views = [np.asarray(Image.open(io.BytesIO(b)).reduce(2)) for b in table.column("image").to_pylist()]
    np.testing.assert_array_equal(np.array(table.column("codebook_tokens").to_pylist()), codebook_tokens(views))
    dataset = ImageDataset(out, ImageAugment(48))
    batch = dataset.collator()([dataset[i] for i in range(len(dataset))])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "pixel_values": (9, 3, 48, 48),
        "bool_masked_pos": (9, 9),
        "mim_labels": (9, 9),
    }


def test_image_list_file_with_integer_and_named_labels(image_folders: Path):
    train = image_folders / "train"
    (image_folders / "ints.txt").write_text("ant/ant_0.jpg 7\nzebra/zebra_1.jpg 3\nmissing.jpg 1\nno_label_here\n")
    out = image_folders / "out_ints"
    rc = images.main(
        image_args(image_folders / "ints.txt", out, "--image-root", str(train), "--max-skip-fraction", "1")
    )
    assert rc == 0
    assert read_table(out).select(["id", "label"]).to_pylist() == [
        {"id": "ant/ant_0.jpg", "label": 7},
        {"id": "zebra/zebra_1.jpg", "label": 3},
    ]
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"bad_record": 1, "missing_file": 1}
    assert not (out / "classes.json").exists()

    (image_folders / "named.txt").write_text("zebra/zebra_0.jpg zebra\nant/ant_1.jpg ant\n")
    out = image_folders / "out_named"
    assert images.main(image_args(image_folders / "named.txt", out, "--image-root", str(train))) == 0
    assert json.loads((out / "classes.json").read_text()) == {"ant": 0, "zebra": 1}
    assert read_table(out).column("label").to_pylist() == [1, 0]

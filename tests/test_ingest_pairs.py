"""Image-text data in the forms PMD subsets come in, made with the ecosystem's own writers: webdataset tars
(``TarWriter``), Hugging Face ``datasets`` Parquet / ``save_to_disk`` with the ``Image`` feature, img2dataset's raw
bytes Parquet, COCO caption annotations, headerless TSV. Every stored image must still carry its own captions."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flava_ds.data.arrow_dataset import ArrowShards
from flava_ds.data.image_dataset import ImageAugment
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.sampler import SampleKey
from flava_ds.data.tokenizer import Tokenizer
from preprocess import pairs
from tests.data_fixtures import CODEBOOK, WORDS, make_tokenizer
from tests.launch import ROOT
from tests.text_fixtures import write_jsonl

N = 12


def colour(i: int) -> tuple[int, int, int]:
    return (i * 53 % 256, i * 97 % 256, 255 - i * 19 % 256)


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    """A flat image whose colour names sample i (survives resizing and JPEG)."""
    buffer = io.BytesIO()
    Image.new("RGB", (48 + 8 * (i % 3), 40), colour(i)).save(buffer, fmt)
    return buffer.getvalue()


def captions_of(i: int, n: int = 1) -> list[str]:
    """n captions naming sample i: 'sample <i> caption <c> ...' (more than 3 words)."""
    return [f"sample {i} caption {c} {WORDS[(i + c) % len(WORDS)]} {WORDS[c]}" for c in range(n)]


def sample_of_image(jpeg: bytes) -> int:
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32).mean((0, 1))
    return int(np.argmin([np.abs(mean - np.array(colour(i))).sum() for i in range(N)]))


def sample_of_caption(caption: str) -> int:
    return int(caption.split()[1])


def convert(root: Path, out: Path, *inputs: str, extra: tuple[str, ...] = ()) -> int:
    args = ["--input", *inputs, "--output", str(out), "--tokenizer", str(root / "tokenizer.json")]
    return pairs.main([*args, "--codebook", CODEBOOK, "--image-size", "32", "--workers", "2", "--no-progress", *extra])


def stored_rows(out: Path) -> list[dict]:
    files = sorted(out.glob("shard-*.arrow"))
    return [row for f in files for row in pa.ipc.open_file(pa.memory_map(str(f))).read_all().to_pylist()]


def assert_paired(rows: list[dict], tokenizer: Tokenizer) -> None:
    """Each stored image carries its own captions, and each caption its own token ids."""
    for row in rows:
        assert {sample_of_caption(c) for c in row["captions"]} == {sample_of_image(row["image"])}, row["id"]
        assert row["input_ids"] == [tokenizer.encode(c, 77) for c in row["captions"]]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ingest")
    make_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def tokenizer(root: Path) -> Tokenizer:
    return Tokenizer.from_file(root / "tokenizer.json")


@pytest.fixture(scope="module")
def tars(root: Path) -> Path:
    """Two img2dataset-style tars (key.jpg + key.txt + key.json) with a corrupt image and a sample with no image."""
    import webdataset as wds

    directory = root / "tars"
    directory.mkdir()
    for t in range(2):
        with wds.TarWriter(str(directory / f"{t:05d}.tar")) as sink:
            for i in range(t * 6, t * 6 + 6):
                sample = {"__key__": f"{i:09d}", "txt": captions_of(i)[0], "json": {"key": i, "url": f"http://x/{i}"}}
                if i == 3:
                    sample["jpg"] = b"not an image"
                elif i == 8:
                    pass  # caption and metadata only: img2dataset's failed download
                else:
                    sample["png" if i % 4 == 1 else "jpg"] = image_bytes(i, "PNG" if i % 4 == 1 else "JPEG")
                sink.write(sample)
    return directory


def test_webdataset_tars_by_brace_range_keep_each_image_with_its_caption(root, tars, tokenizer):
    out = root / "out_tars"
    assert convert(root, out, str(tars / "{00000..00001}.tar"), extra=("--max-skip-fraction", "0.5")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs_seen"] == 12 and manifest["samples_written"] == 10
    assert manifest["skipped"] == {"bad_record": 1, "corrupt_image": 1}
    assert [s["num_records"] for s in manifest["shards"]] == [6, 6]  # one output shard per tar
    rows = stored_rows(out)
    assert [r["id"] for r in rows] == [f"0000{i // 6}.tar/{i:09d}" for i in range(12) if i not in (3, 8)]
    assert_paired(rows, tokenizer)


def test_a_machine_never_opens_the_other_machines_tars(root, tars, tmp_path):
    """Node 1 of 2 converts tar 1 only: tar 0 is garbage here, and node 1 must not even notice."""
    (tmp_path / "00000.tar").write_bytes(b"garbage, not a tar")
    (tmp_path / "00001.tar").write_bytes((tars / "00001.tar").read_bytes())
    out = tmp_path / "out"
    extra = ("--num-shards", "2", "--shard-index", "1", "--max-skip-fraction", "0.5")
    manifest_path = out / "manifest-node001-of-002.json"
    rc = convert(root, out, str(tmp_path / "0000{0,1}.tar"), extra=extra)
    assert rc == 0, "node 1 read tar 0"
    manifest = json.loads(manifest_path.read_text())
    assert [s["index"] for s in manifest["shards"]] == [1]
    assert manifest["skipped"] == {"bad_record": 1}  # tar 1's sample without an image, nothing of tar 0


def test_pipe_urls_are_read_through_the_webdataset_package(root, tars, tokenizer):
    out = root / "out_pipe"
    url = f"pipe:cat {tars / '00000.tar'}"
    assert convert(root, out, url, extra=("--format", "webdataset", "--max-skip-fraction", "0.5")) == 0
    rows = stored_rows(out)
    assert [r["id"] for r in rows] == [f"00000.tar/{i:09d}" for i in (0, 1, 2, 4, 5)]
    assert_paired(rows, tokenizer)


def test_the_caption_can_come_from_a_json_field_of_the_tar(root, tars, tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "meta.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": image_bytes(i), "json": {"caption": captions_of(i)[0]}})
    out = tmp_path / "out"
    assert convert(root, out, str(tmp_path / "meta.tar"), extra=("--caption-field", "caption")) == 0
    assert [r["captions"] for r in stored_rows(out)] == [captions_of(i) for i in range(4)]


def _hf_dataset(with_list: bool = False):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}
        if with_list
        else {"image": datasets.Image(), "caption": datasets.Value("string")}
    )
    images = [Image.open(io.BytesIO(image_bytes(i))) for i in range(N)]
    texts = [captions_of(i, 2) if with_list else captions_of(i)[0] for i in range(N)]
    return datasets.Dataset.from_dict({"image": images, "caption": texts}, features=features)


def test_hf_datasets_parquet_and_save_to_disk_with_the_image_feature(root, tokenizer, tmp_path):
    _hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    _hf_dataset(with_list=True).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out_parquet"
    assert convert(root, out, str(tmp_path / "train.parquet")) == 0
    rows = stored_rows(out)
    assert len(rows) == N and [r["id"] for r in rows] == [f"train.parquet:{i}" for i in range(N)]
    assert_paired(rows, tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs_seen"] == N and manifest["skipped"] == {}
    out = tmp_path / "out_saved"
    assert convert(root, out, str(tmp_path / "saved")) == 0
    rows = stored_rows(out)
    assert [len(r["captions"]) for r in rows] == [2] * N  # a caption field holding a list: all kept, image once
    assert_paired(rows, tokenizer)


def test_a_hub_cache_directory_and_img2dataset_raw_bytes_parquet(root, tokenizer, tmp_path):
    cache = tmp_path / "hub" / "data"
    cache.mkdir(parents=True)
    for part in range(2):
        ids = range(part * 6, part * 6 + 6)
        table = pa.table({"jpg": [image_bytes(i) for i in ids], "caption": [captions_of(i)[0] for i in ids]})
        pq.write_table(table, cache / f"train-{part:05d}-of-00002.parquet")
    out = tmp_path / "out"
    assert convert(root, out, str(tmp_path / "hub"), extra=("--image-field", "jpg")) == 0
    rows = stored_rows(out)
    assert [r["id"] for r in rows] == [f"data/train-0000{i // 6}-of-00002.parquet:{i % 6}" for i in range(N)]
    assert_paired(rows, tokenizer)


def _coco(path: Path, images: list[dict], captions: dict[int, list[str]]) -> Path:
    annotations = [
        {"id": 1000 * image_id + n, "image_id": image_id, "caption": text}
        for image_id, texts in captions.items()
        for n, text in enumerate(texts)
    ]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def test_coco_captions_store_each_image_once_with_all_its_captions(root, tokenizer, tmp_path):
    (tmp_path / "train2017").mkdir()
    images, captions = [], {}
    for i in range(N):
        name = f"{i:012d}.jpg"
        (tmp_path / "train2017" / name).write_bytes(image_bytes(i))
        images.append({"id": 500 + i, "file_name": name, "width": 48, "height": 40})
        captions[500 + i] = captions_of(i, 5)
    captions[502][3] = "too short"  # dropped from its image, which keeps the other four
    ann = _coco(tmp_path / "captions_train2017.json", images, captions)
    out = tmp_path / "out"
    assert convert(root, out, str(ann), extra=("--image-root", str(tmp_path / "train2017"))) == 0
    rows = stored_rows(out)
    assert [r["id"] for r in rows] == [f"captions_train2017.json:{500 + i}" for i in range(N)]
    assert [len(r["captions"]) for r in rows] == [5, 5, 4] + [5] * (N - 3)
    assert rows[2]["captions"] == [c for c in captions_of(2, 5) if c != captions_of(2, 5)[3]]
    assert_paired(rows, tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs_seen"] == N and manifest["skipped"] == {} and manifest["dropped"] == {"too_few_words": 1}

    # training draws one caption per (sample, epoch), each of them over epochs; negatives come from other images
    dataset = ImageTextDataset(out, tokenizer, ImageAugment(crop_size=32), seed=0, itm_negative_prob=0.0)
    stored = [tuple(ids.tolist()) for ids in dataset.captions(0)]
    drawn = {tuple(dataset[SampleKey(0, epoch)]["input_ids"].tolist()) for epoch in range(40)}
    assert drawn == set(stored)
    again = ImageTextDataset(out, tokenizer, ImageAugment(crop_size=32), seed=0, itm_negative_prob=0.0)
    assert [dataset[SampleKey(0, e)]["input_ids"].tolist() for e in range(5)] == [
        again[SampleKey(0, e)]["input_ids"].tolist() for e in range(5)
    ]
    negatives = ImageTextDataset(out, tokenizer, ImageAugment(crop_size=32), seed=0, itm_negative_prob=1.0)
    own = {tuple(ids.tolist()) for ids in negatives.captions(4)}
    for epoch in range(10):
        assert tuple(negatives[SampleKey(4, epoch)]["input_ids"].tolist()) not in own


def test_a_headerless_tsv_is_refused_until_its_columns_are_named(root, tokenizer, tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        lines.append(f"{captions_of(i)[0]}\timg/{i}.jpg")
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    extra = ("--image-root", str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        convert(root, out, str(tmp_path / "cc.tsv"), extra=extra)
    assert refused.value.code == 2
    assert not (out / "manifest.json").exists()
    fixed = (*extra, "--columns", "caption,image")
    assert convert(root, out, str(tmp_path / "cc.tsv"), extra=fixed) == 0
    rows = stored_rows(out)
    assert [r["id"] for r in rows] == [f"cc.tsv:{i}" for i in range(1, 7)]  # the first line is a sample
    assert_paired(rows, tokenizer)


def test_compressed_jsonl_and_csv_inputs(root, tokenizer, tmp_path):
    import gzip

    import zstandard

    (tmp_path / "img").mkdir()
    records = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        records.append({"image": f"img/{i}.jpg", "caption": captions_of(i)[0]})
    write_jsonl(tmp_path / "a.jsonl.gz", records[:3], gzip.open)
    write_jsonl(tmp_path / "b.jsonl.zst", records[3:], zstandard.open)
    out = tmp_path / "out"
    assert convert(root, out, str(tmp_path / "*.jsonl.*"), extra=("--image-root", str(tmp_path))) == 0
    assert [r["captions"][0] for r in stored_rows(out)] == [r["caption"] for r in records]
    csv_text = 'caption,image\n"a caption, with a comma and more",img/0.jpg\n' + "".join(
        f"{r['caption']},{r['image']}\n" for r in records[1:]
    )
    (tmp_path / "c.csv").write_text(csv_text)
    out = tmp_path / "out_csv"
    assert convert(root, out, str(tmp_path / "c.csv"), extra=("--image-root", str(tmp_path))) == 0
    assert stored_rows(out)[0]["captions"] == ["a caption, with a comma and more"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocess.pairs", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_wrong_field_fails_before_the_codebook_loads_naming_the_fields_present(root, tmp_path):
    _hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "out"
    common = ["--input", str(tmp_path / "train.parquet"), "--output", str(out), "--image-size", "32"]
    common += ["--tokenizer", str(root / "tokenizer.json"), "--workers", "2", "--no-progress"]
    # a codebook directory that does not exist: had the converter got as far as loading it, it would say so
    wrong = _run_cli(*common, "--caption-field", "text", "--codebook", str(tmp_path / "no_codebook"))
    assert wrong.returncode == 2
    assert "no column 'text'" in wrong.stderr and "['image', 'caption']" in wrong.stderr, wrong.stderr
    assert "codebook" not in wrong.stderr.lower()
    assert not (out / "manifest.json").exists()
    fixed = _run_cli(*common, "--caption-field", "caption", "--codebook", CODEBOOK)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((out / "manifest.json").read_text())["samples_written"] == N


def test_an_image_root_holding_none_of_the_images_is_refused(root, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", ({"image": f"img/{i}.jpg", "caption": captions_of(i)[0]} for i in range(4)))
    with pytest.raises(SystemExit) as refused:
        convert(root, tmp_path / "out", str(tmp_path / "pairs.jsonl"), extra=("--image-root", str(tmp_path)))
    assert refused.value.code == 2


def test_a_finished_output_refuses_other_settings_until_overwrite(root, tmp_path):
    _hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "out"
    assert convert(root, out, str(tmp_path / "train.parquet")) == 0
    with pytest.raises(SystemExit, match="--overwrite"):
        convert(root, out, str(tmp_path / "train.parquet"), extra=("--max-length", "16"))
    assert convert(root, out, str(tmp_path / "train.parquet"), extra=("--max-length", "16", "--overwrite")) == 0
    shards = ArrowShards(out)
    assert len(shards) == N and shards.args["max_length"] == 16
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.arrow"]


def test_parquet_shards_read_only_their_own_rows_and_equal_the_streamed_cut(tmp_path):
    """Row-range shards (what a machine of a multi-machine run reads) hold exactly the records of reading every
    file in order and cutting every --shard-size, across files and row groups."""
    from preprocess.readers import input_blocks, row_range_shards
    from preprocess.shards import fixed_size_shards

    paths = []
    for n, rows in enumerate((7, 12, 4)):
        path = tmp_path / f"part{n}.parquet"
        pq.write_table(pa.table({"caption": [f"file {n} row {r}" for r in range(rows)]}), path, row_group_size=5)
        paths.append(str(path))
    blocks = input_blocks(paths, "parquet", ["caption"])
    streamed = [r for b in blocks for r in b.read()]
    assert len(streamed) == 23
    for size in (1, 3, 5, 8, 30):
        lazy = row_range_shards(blocks, size)
        assert [s.first_record for s in lazy] == list(range(0, 23, size))
        assert [s.load() for s in lazy] == [s.load() for s in fixed_size_shards(iter(streamed), size)]


def test_two_machines_on_parquet_make_the_single_run(root, tmp_path):
    _hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    single, split = tmp_path / "single", tmp_path / "split"
    assert convert(root, single, str(tmp_path / "train.parquet"), extra=("--shard-size", "5")) == 0
    for node in ("0", "1"):
        extra = ("--shard-size", "5", "--num-shards", "2", "--shard-index", node)
        assert convert(root, split, str(tmp_path / "train.parquet"), extra=extra) == 0
    names = sorted(p.name for p in single.glob("shard-*.arrow"))
    assert names == sorted(p.name for p in split.glob("shard-*.arrow")) and len(names) == 3
    for name in names:
        assert (single / name).read_bytes() == (split / name).read_bytes()

"""preprocess/text.py reads the forms text corpora arrive in (compressed JSON lines, Parquet, ``save_to_disk``
directories, hub-cache directories, one document per line), and refuses wrong inputs before loading anything."""

from __future__ import annotations

import bz2
import gzip
import json
import tarfile
import zipfile
from pathlib import Path

import datasets
import pytest
import zstandard

from flava_ds.data.text_dataset import IndexedDataset
from flava_ds.data.tokenizer import Tokenizer
from preprocess.text import count_documents
from preprocess.text import main as preprocess_text
from tests.text_fixtures import HOSTILE_JSONL, HOSTILE_SKIPS, run_text_preprocess, write_corpus
from tools.train_tokenizer import train_wordpiece


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same documents in every input form, a tokenizer, and the plain-JSONL run's output to compare with."""
    root = tmp_path_factory.mktemp("ingest")
    jsonl = root / "docs.jsonl"
    docs = write_corpus(jsonl, 150, seed=4, words_per_doc=(1, 60))
    tokenizer = train_wordpiece([jsonl], 120, root / "tok" / "tokenizer.json")
    lines = jsonl.read_bytes().splitlines(keepends=True)
    for part, chunk in enumerate((lines[:70], lines[70:])):
        with gzip.open(root / f"part-{part}.jsonl.gz", "wb") as f:
            f.writelines(chunk)
    with zstandard.open(root / "docs.jsonl.zst", "wb") as f:
        f.write(jsonl.read_bytes())
    table = datasets.Dataset.from_dict({"text": docs, "url": [f"https://x/{i}" for i in range(len(docs))]})
    table.to_parquet(str(root / "docs.parquet"))
    table.save_to_disk(str(root / "saved"))
    snapshot = root / "hub" / "datasets--org--docs" / "snapshots" / "0123abc" / "data"
    snapshot.mkdir(parents=True)
    for i in range(2):
        table.shard(2, i, contiguous=True).to_parquet(str(snapshot / f"train-{i:05d}-of-00002.parquet"))
    with gzip.open(root / "lines.txt.gz", "wt") as f:
        f.write("".join(f"{d}\n\n" if i % 10 == 0 else f"{d}\n" for i, d in enumerate(docs)))
    reference = root / "reference"
    assert run([jsonl], reference, tokenizer, "--workers", "0") == 0
    return {"root": root, "docs": docs, "tokenizer": tokenizer, "reference": reference}


def run(inputs, output, tokenizer, *extra: str) -> int:
    """preprocess.text in shards of 40 documents."""
    return run_text_preprocess(inputs, output, tokenizer, "--shard-size", "40", *extra)


def merged_files(output: Path) -> list[bytes]:
    return [(output / f"text{suffix}").read_bytes() for suffix in (".bin", ".idx")]


@pytest.mark.parametrize(
    ("inputs", "extra"),
    [
        (["part-{0..1}.jsonl.gz"], ["--workers", "0"]),
        (["docs.jsonl.zst"], ["--workers", "1"]),
        (["docs.parquet"], ["--workers", "0", "--text-field", "text"]),
        (["saved"], ["--workers", "0"]),
        (["hub/datasets--org--docs"], ["--workers", "2"]),
        (["lines.txt.gz"], ["--workers", "0", "--doc-per-line"]),
    ],
    ids=["jsonl.gz-brace-range", "jsonl.zst", "parquet", "save_to_disk", "hub-cache-dir", "doc-per-line"],
)
def test_every_input_form_gives_the_same_documents_and_tokens_as_plain_jsonl(corpus, tmp_path, inputs, extra):
    root = corpus["root"]
    assert run([root / i for i in inputs], tmp_path, corpus["tokenizer"], *extra) == 0
    expected = Tokenizer.from_file(corpus["tokenizer"]).encode_raw(corpus["docs"])
    ds = IndexedDataset(str(tmp_path / "text"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert merged_files(tmp_path) == merged_files(corpus["reference"]), "byte-identical to the plain JSONL run"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["inputs_seen"] == manifest["samples_written"] == len(corpus["docs"])
    assert manifest["skipped"] == {}


def test_the_progress_total_is_known_from_parquet_footers_only(corpus):
    root = corpus["root"]
    assert count_documents([root / "docs.parquet", root / "hub"], "text") == 2 * len(corpus["docs"])
    assert count_documents([root / "docs.parquet", root / "docs.jsonl.zst"], "text") is None


def test_skips_in_a_compressed_file_are_counted_by_reason_and_named_by_line(corpus, tmp_path, capsys):
    source = tmp_path / "hostile.jsonl.bz2"
    with bz2.open(source, "wb") as f:
        f.write(HOSTILE_JSONL)
    assert run([source], tmp_path / "out", corpus["tokenizer"], "--workers", "0", "--max-skip-fraction", "1") == 0
    err = capsys.readouterr().err
    assert "skipped (bad_record) hostile.jsonl.bz2:6" in err and "skipped (not_utf8) hostile.jsonl.bz2:7" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skip_examples"]["bad_record"] == ["hostile.jsonl.bz2:6"]
    assert manifest["inputs_seen"] == 10 and manifest["samples_written"] == 2
    assert manifest["skipped"] == HOSTILE_SKIPS
    ds = IndexedDataset(str(tmp_path / "out" / "text"))
    expected = Tokenizer.from_file(corpus["tokenizer"]).encode_raw(["good dog", "walking cat"])
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def refusal(capsys, argv: list[str]) -> str:
    """The error line of a run that must stop with a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        preprocess_text(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1
    return errors[0]


@pytest.fixture
def broken_tokenizer(tmp_path) -> Path:
    """A tokenizer.json that fails to load: a refusal naming the input proves the tokenizer was never loaded."""
    path = tmp_path / "broken" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text("not a tokenizer")
    return path


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("part-0.jsonl.gz", "part-0.jsonl.gz: no field 'txt' in the first 70 records; fields present: ['text']"),
        ("docs.parquet", "docs.parquet: no column 'txt'; columns present: ['text', 'url']"),
        ("saved", "saved: no column 'txt'; columns present: ['text', 'url']"),
    ],
)
def test_a_wrong_field_fails_before_the_tokenizer_loads_and_the_corrected_rerun_succeeds(
    corpus, tmp_path, capsys, broken_tokenizer, source, message
):
    path, out = corpus["root"] / source, tmp_path / "out"
    argv = ["--input", str(path), "--output", str(out), "--tokenizer", str(broken_tokenizer), "--json-key", "txt"]
    line = refusal(capsys, argv)
    assert message in line and "--text-field" in line
    assert not (out / "manifest.json").exists()
    assert run([path], out, corpus["tokenizer"], "--text-field", "text", "--workers", "0") == 0
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {}


def _gzip(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


def _zstd(path: Path, data: bytes) -> None:
    with zstandard.open(path, "wb") as f:
        f.write(data)


def _parquet(path: Path, data: bytes) -> None:
    datasets.Dataset.from_dict({"text": [data.decode()]}).to_parquet(str(path))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_gzip, "corpus.txt: looks like gzip-compressed data, not plain text; rename it to corpus.txt.gz"),
        (_zstd, "corpus.txt: looks like zstd-compressed data, not plain text; rename it to corpus.txt.zst"),
        (_parquet, "corpus.txt: looks like a Parquet file, not plain text; rename it to corpus.parquet"),
    ],
    ids=["gzip", "zstd", "parquet"],
)
def test_a_binary_file_named_txt_is_refused_saying_what_it_is(tmp_path, capsys, broken_tokenizer, write, message):
    source = tmp_path / "corpus.txt"
    write(source, b"some text\n" * 50)
    argv = ["--input", str(source), "--output", str(tmp_path / "out"), "--tokenizer", str(broken_tokenizer)]
    assert message in refusal(capsys, argv)


def _tar_gz(path: Path) -> None:
    (path.parent / "docs.txt").write_text("a doc\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(path.parent / "docs.txt", arcname="docs.txt")


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("docs.jsonl", '{"text": "a doc"}\n')


def _lz4(path: Path) -> None:
    path.write_bytes(b"\x04\x22\x4d\x18" + bytes(range(64)))  # an lz4 frame header (no lz4 writer installed)


@pytest.mark.parametrize(
    ("name", "write"),
    [("docs.tar.gz", _tar_gz), ("docs.jsonl.zip", _zip), ("docs.jsonl.lz4", _lz4)],
)
def test_an_unsupported_archive_or_compression_is_refused_in_one_line(tmp_path, capsys, broken_tokenizer, name, write):
    source = tmp_path / name
    write(source)
    argv = ["--input", str(source), "--output", str(tmp_path / "out"), "--tokenizer", str(broken_tokenizer)]
    line = refusal(capsys, argv)
    assert f"{name}: " in line and "files are not read" in line
    assert "Read: JSON lines (.jsonl/.json/.ndjson) and plain text" in line and ".parquet" in line

"""preprocess/text.py -> megatron-core IndexedDataset, and TextDataset/TextCollator on top of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flava_ds.data.sampler import ResumableDistributedSampler, SampleKey
from flava_ds.data.text_dataset import IndexedDataset, TextCollator, TextDataset
from flava_ds.data.tokenizer import Tokenizer
from preprocess.sharded_run import EXIT_TOO_MANY_SKIPS
from preprocess.text import main as preprocess_text
from tests.launch import ROOT
from tests.text_fixtures import HOSTILE_JSONL, HOSTILE_SKIPS, run_text_preprocess, train_tokenizers, write_corpus

PLAIN_TEXT = "first doc line one\nline two\n\n\n   \nsecond doc\n\nthird doc\n"
PLAIN_DOCS = ["first doc line one\nline two", "second doc", "third doc"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text")
    tokenizers = train_tokenizers(directory)
    jsonl = directory / "docs.jsonl"
    docs = write_corpus(jsonl, 300, seed=3, words_per_doc=(1, 120))
    plain = directory / "docs.txt"
    plain.write_text(PLAIN_TEXT)
    return {"dir": directory, "tokenizers": tokenizers, "inputs": [jsonl, plain], "docs": docs + PLAIN_DOCS}


def read_sequences(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1)), "one document per sequence"
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_megatron_reads_the_documents_and_tokens(corpus, tmp_path, kind):
    tokenizer = corpus["tokenizers"][kind]
    assert run_text_preprocess(corpus["inputs"], tmp_path, tokenizer, "--workers", "2", "--shard-size", "64") == 0
    expected = Tokenizer.from_file(tokenizer).encode_raw(corpus["docs"])
    assert read_sequences(tmp_path / "text") == expected
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples_written"] == len(expected) == manifest["merged"]["documents"]
    assert manifest["fingerprints"]["tokenizer"] == Tokenizer.from_file(tokenizer).fingerprint
    assert len(manifest["shards"]) == 5 and manifest["skipped"] == {}


def test_workers_do_not_change_the_output(corpus, tmp_path):
    tokenizer = corpus["tokenizers"]["tokenizer.json"]
    outputs = {}
    for workers in ("0", "1", "2"):
        out = tmp_path / workers
        assert run_text_preprocess(corpus["inputs"], out, tokenizer, "--workers", workers, "--shard-size", "50") == 0
        outputs[workers] = [(out / f"text{s}").read_bytes() for s in (".bin", ".idx")]
    assert outputs["0"] == outputs["1"] == outputs["2"]


def write_hostile(directory: Path) -> list[Path]:
    jsonl = directory / "hostile.jsonl"
    jsonl.write_bytes(HOSTILE_JSONL)
    plain = directory / "hostile.txt"
    plain.write_bytes(b"ok doc\n\nbroken \xfe\xff doc\nsecond line\n\n\n\nlast doc\n")
    return [jsonl, plain]


def test_hostile_input_is_counted_exactly(corpus, tmp_path, capsys):
    inputs = write_hostile(tmp_path)
    tokenizer = corpus["tokenizers"]["tokenizer.json"]
    assert run_text_preprocess(inputs, tmp_path / "out", tokenizer, "--max-skip-fraction", "0.9") == 0
    assert "skipped (not_utf8) hostile.jsonl:8" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "hostile.jsonl:8" in manifest["skip_examples"]["not_utf8"]
    assert manifest["inputs_seen"] == 13
    assert manifest["samples_written"] == 4
    assert manifest["skipped"] == {**HOSTILE_SKIPS, "not_utf8": 3}  # and the plain file's undecodable document
    assert read_sequences(tmp_path / "out" / "text") == Tokenizer.from_file(tokenizer).encode_raw(
        ["good dog", "walking cat", "ok doc", "last doc"]
    )
    code = run_text_preprocess(inputs, tmp_path / "strict", tokenizer, "--max-skip-fraction", "0.5")
    assert code == EXIT_TOO_MANY_SKIPS
    assert not json.loads((tmp_path / "strict" / "manifest.json").read_text())["skip_check"]["passed"]
    assert not (tmp_path / "strict" / "text.idx").exists(), "a failed run is not merged"


def test_sigkill_then_rerun_gives_identical_output(corpus, tmp_path):
    big = tmp_path / "big.jsonl"
    write_corpus(big, 15_000, seed=9)
    tokenizer = corpus["tokenizers"]["tokenizer.json"]
    assert run_text_preprocess([big], tmp_path / "clean", tokenizer, "--workers", "0", "--shard-size", "500") == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "preprocess.text", "--input", str(big), "--output", str(out)]
    cmd += ["--tokenizer", str(tokenizer), "--workers", "1", "--shard-size", "500", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 60
    while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = json.loads(manifest.read_text())
    assert not at_kill["complete"] and 0 < len(at_kill["shards"]) < 30
    assert not (out / "text.bin").exists()

    assert run_text_preprocess([big], out, tokenizer, "--workers", "2", "--shard-size", "500") == 0
    for suffix in (".bin", ".idx"):
        assert (out / f"text{suffix}").read_bytes() == (tmp_path / "clean" / f"text{suffix}").read_bytes()
    finished = json.loads(manifest.read_text())
    assert finished["shards"][0] == at_kill["shards"][0], "a finished shard is not redone"
    assert finished["samples_written"] == 15_000
    assert not list(out.glob(".tmp-*"))


def test_nodes_write_disjoint_parts_that_together_hold_every_document(corpus, tmp_path):
    tokenizer = Tokenizer.from_file(corpus["tokenizers"]["tokenizer.json"])
    for node in ("0", "1"):
        args = ["--num-shards", "2", "--shard-index", node, "--shard-size", "40"]
        assert run_text_preprocess(corpus["inputs"], tmp_path, tokenizer.path, *args) == 0
    assert sorted(p.name for p in tmp_path.glob("text*.idx")) == ["text-node000-of-002.idx", "text-node001-of-002.idx"]
    ds = TextDataset(tmp_path, tokenizer, max_length=512)
    assert len(ds.prefixes) == 2
    stored = sorted(ds[i]["input_ids"][1:-1].tolist() for i in range(len(ds)))
    assert stored == sorted(tokenizer.encode_raw(corpus["docs"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--input": "missing.jsonl"}, "--input 'missing.jsonl': no such file"),
        ({"--tokenizer": "missing.json"}, "tokenizer file not found"),
        ({"--shard-index": "2", "--num-shards": "2"}, "--shard-index 2 not in"),
    ],
)
def test_bad_flags_are_usage_errors(corpus, tmp_path, capsys, change, message):
    args = {"--input": str(corpus["inputs"][0]), "--tokenizer": str(corpus["tokenizers"]["tokenizer.json"])}
    args = {**args, "--output": str(tmp_path), **change}
    with pytest.raises(SystemExit) as exit_info:
        preprocess_text([item for pair in args.items() for item in pair])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_changed_settings_refuse_to_resume(corpus, tmp_path):
    tokenizers = corpus["tokenizers"]
    assert run_text_preprocess(corpus["inputs"], tmp_path, tokenizers["tokenizer.json"]) == 0
    with pytest.raises(SystemExit, match="different settings"):
        run_text_preprocess(corpus["inputs"], tmp_path, tokenizers["sentencepiece"])


@pytest.fixture(scope="module")
def text_data(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("dataset")
    tokenizer = Tokenizer.from_file(corpus["tokenizers"]["tokenizer.json"])
    assert run_text_preprocess(corpus["inputs"], output, tokenizer.path, "--workers", "0") == 0
    return output, tokenizer, tokenizer.encode_raw(corpus["docs"])


def test_windows_cover_every_document_once(text_data):
    output, tokenizer, docs = text_data
    ds = TextDataset(output, tokenizer, max_length=32)
    pieces: list[list[int]] = [[] for _ in docs]
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id and 3 <= len(ids) <= 32
        pieces[int(ds._sequence[i])].extend(ids[1:-1].tolist())
    assert pieces == docs
    assert len(ds) > len(docs), "long documents are split into several windows"
    assert TextDataset(output / "text", tokenizer, max_length=32)._start.tolist() == ds._start.tolist()
    with pytest.raises(FileNotFoundError, match="neither an indexed dataset"):
        TextDataset(output / "nope", tokenizer)


def test_dataset_refuses_a_different_tokenizer(text_data, corpus):
    output, tokenizer, _ = text_data
    other = Tokenizer.from_file(corpus["tokenizers"]["sentencepiece"])
    for path in (output, output / "text"):
        with pytest.raises(ValueError, match=f"tokenized with tokenizer {tokenizer.fingerprint}"):
            TextDataset(path, other)


def test_collate_pads_and_masks_reproducibly(text_data):
    output, tokenizer, _ = text_data
    ds = TextDataset(output, tokenizer, max_length=24)
    collate = TextCollator(tokenizer, seed=5)
    keys = [SampleKey(i, epoch=1) for i in (0, 1, 2, 3)]
    batch = collate([ds[k] for k in keys])
    lengths = [len(ds[k]["input_ids"]) for k in keys]
    assert set(batch) == {"input_ids", "input_ids_masked", "attention_mask", "mlm_labels"}
    assert all(t.dtype == torch.long and t.shape == (4, max(lengths)) for t in batch.values())
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["mlm_labels"][pad] == -100).all()
    selected = batch["mlm_labels"] != -100
    assert (selected.sum(1) >= 1).all()
    assert torch.equal(batch["mlm_labels"][selected], batch["input_ids"][selected])
    again = collate([ds[k] for k in keys])
    assert all(torch.equal(batch[name], again[name]) for name in batch)
    other_epoch = collate([ds[SampleKey(k.index, epoch=2)] for k in keys])
    assert not torch.equal(batch["mlm_labels"], other_epoch["mlm_labels"])


def test_dataloader_with_workers_matches_direct_collation(text_data):
    output, tokenizer, _ = text_data
    ds = TextDataset(output, tokenizer, max_length=24)
    sampler = ResumableDistributedSampler(len(ds), 4, seed=1, consumed_samples=8)
    collate = TextCollator(tokenizer, seed=5)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    for batch, keys in zip(loader, sampler):
        direct = collate([ds[k] for k in keys])
        assert all(torch.equal(batch[name], direct[name]) for name in batch)
        if keys[0].index == sampler.micro_batch(8)[0].index:
            break


def test_whole_word_masking_on_real_tokens(text_data):
    output, tokenizer, _ = text_data
    ds = TextDataset(output, tokenizer, max_length=128)
    collate = TextCollator(tokenizer, seed=0)
    for i in range(0, len(ds), 7):
        sample = ds[i]
        _, labels = collate.mask(sample["input_ids"], SampleKey(i))
        word_of = np.cumsum(tokenizer.word_starts(sample["input_ids"]))
        selected = labels != -100
        for w in np.unique(word_of[selected]):
            assert selected[word_of == w].all(), "all pieces of a selected word are masked"

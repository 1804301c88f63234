"""The three tokenizer file kinds behind one interface: special ids, [CLS]/[SEP], truncation, word starts."""

from __future__ import annotations

import json
import pickle

import pytest

from flava_ds.data.tokenizer import Tokenizer, TokenizerError
from tests.text_fixtures import train_tokenizers
from tools.train_tokenizer import main as train_tokenizer_main

TEXT = "Unbelievable happiness tokenization runs"
WORDS = TEXT.lower().split()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return train_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt", "bpe", "sentencepiece"])
def tok(request, paths):
    return Tokenizer.from_file(paths[request.param])


def test_special_ids(tok):
    assert tok.pad_id == 0
    assert [tok.id_to_token(i) for i in (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    assert {tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id} <= tok.special_ids
    assert tok.vocab_size > max(tok.special_ids)


def test_encode_adds_cls_sep_and_truncates_keeping_sep(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert not set(ids[1:-1]) & tok.special_ids
    assert len(ids) > len(WORDS) + 2, "the fixture words must be split into word pieces"
    short = tok.encode(TEXT, max_length=5)
    assert short == [*ids[:4], tok.sep_id]
    assert tok.encode_batch([TEXT, "cat"], max_length=5)[0] == short
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(TEXT, max_length=1)


def test_decode_round_trip(tok):
    assert tok.decode(tok.encode(TEXT)) == TEXT.lower()


def test_word_starts_group_pieces_into_words(tok):
    ids = tok.encode(TEXT)
    starts = tok.word_starts(ids)
    assert len(starts) == len(ids)
    assert starts[0] and starts[-1], "specials are word starts"
    words, current = [], ""
    for idx, start in zip(ids[1:-1], starts[1:-1]):
        piece = tok.id_to_token(idx)
        if start and current:
            words.append(current)
            current = ""
        current += piece.removeprefix("##").removeprefix("▁").removeprefix("Ġ")
    words.append(current)
    assert words == WORDS


def test_wordpiece_without_decoder_still_decodes_words(paths, tmp_path):
    raw = json.loads(paths["tokenizer.json"].read_text())
    raw["decoder"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    assert (
        Tokenizer.from_file(tmp_path / "tokenizer.json").decode(
            Tokenizer.from_file(paths["tokenizer.json"]).encode(TEXT)
        )
        == TEXT.lower()
    )


def test_vocab_txt_matches_tokenizer_json(paths):
    wordpiece, vocab = Tokenizer.from_file(paths["tokenizer.json"]), Tokenizer.from_file(paths["vocab.txt"])
    assert vocab.encode(TEXT) == wordpiece.encode(TEXT)
    assert vocab.encode(TEXT.upper()) == vocab.encode(TEXT), "vocab.txt is uncased by default"
    assert Tokenizer.from_file(paths["vocab.txt"], lowercase=False).encode(TEXT.upper()) != vocab.encode(TEXT)


def test_directory_pickle_and_fingerprint(paths):
    tok = Tokenizer.from_file(paths["tokenizer.json"].parent)
    assert tok.path == paths["tokenizer.json"]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXT) == tok.encode(TEXT)
    fingerprints = {Tokenizer.from_file(p).fingerprint for p in paths.values()}
    assert len(fingerprints) == len(paths) and all(len(f) == 16 for f in fingerprints)


def test_pad_not_zero_is_an_error(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\ncat\n")
    with pytest.raises(TokenizerError, match=r"pad token '\[PAD\]' has id 1.*pad id 0"):
        Tokenizer.from_file(vocab)


def test_missing_special_and_unknown_file_are_errors(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncat\n")
    with pytest.raises(TokenizerError, match=r"no mask token"):
        Tokenizer.from_file(vocab)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        Tokenizer.from_file(tmp_path / "x.bin")


def test_train_tokenizer_cli_json_key(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"walking lighthouse {i}"}) + "\n" for i in range(50)))
    out = tmp_path / "tok.json"
    assert (
        train_tokenizer_main(["--input", str(corpus), "--json-key", "body", "--vocab-size", "80", "--output", str(out)])
        == 0
    )
    tok = Tokenizer.from_file(out)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.unk_id not in tok.encode("walking lighthouse 7")

"""Small text corpora and tokenizers for the text tests: long made-up words so WordPiece has to split them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tools.make_demo_data import write_jsonl

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # first in the vocabularies the fixtures train: [PAD] = 0
SYLLABLES = ("un be liev able hap pi ness to ken iza tion re mark cat dog run ning "
             "walk ed ship yard light house").split()  # fmt: skip


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(count)]


def write_corpus(path: Path, num_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (5, 40)) -> list[str]:
    """A JSONL corpus {"text": ...}; returns the documents."""
    rng = np.random.default_rng(seed)
    vocab = make_words(rng, 300)
    docs = [" ".join(rng.choice(vocab, size=rng.integers(*words_per_doc))) for _ in range(num_docs)]
    write_jsonl(path, ({"text": d} for d in docs))
    return docs


HOSTILE_JSONL_LINES = [  # two good records, and lines with one problem each (the skip reason preprocess.text gives)
    b'{"text": "good dog", "url": "a"}',  # other fields are ignored
    b'{"text": ""}',  # empty_text
    b'{"text": "   \\n "}',  # empty_text
    b'{"body": "no text field"}',  # missing_field
    b'{"text": 42}',  # not_a_string
    b"not json at all",  # bad_record
    b'{"text": "bad byte \xff here"}',  # not_utf8
    b'{"text": "lone surrogate \\ud800"}',  # not_utf8
    b'{"text": "\\u0000\\u0001"}',  # only control characters: no_tokens
    b"",  # blank lines are not records
    b'{"text": "walking cat"}',
]
HOSTILE_JSONL = b"\n".join(HOSTILE_JSONL_LINES) + b"\n"
HOSTILE_SKIPS = {"bad_record": 1, "empty_text": 2, "missing_field": 1, "no_tokens": 1, "not_a_string": 1, "not_utf8": 2}


def run_text_preprocess(inputs: Iterable[Path], output: Path, tokenizer: Path, *extra: str) -> int:
    """preprocess.text's exit code for `inputs` (no progress bar)."""
    from preprocess.text import main

    args = ["--input", *map(str, inputs), "--output", str(output), "--tokenizer", str(tokenizer), "--no-progress"]
    return main([*args, *extra])


def train_byte_level_bpe(docs: list[str], path: Path) -> Path:
    """A lower-casing GPT-2 style byte-level BPE tokenizer.json with the BERT specials first ([PAD]=0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def train_tokenizers(directory: Path) -> dict[str, Path]:
    """WordPiece tokenizer.json, the same vocabulary as a BERT vocab.txt, a byte-level BPE and a sentencepiece."""
    from flava_ds.data.tokenizer import Tokenizer
    from tools.train_tokenizer import train_sentencepiece, train_wordpiece

    corpus = directory / "corpus.jsonl"
    docs = write_corpus(corpus, 400)
    wordpiece = train_wordpiece([corpus], 120, directory / "wp" / "tokenizer.json")
    vocab = directory / "vocab.txt"
    tok = Tokenizer.from_file(wordpiece)
    vocab.write_text("".join(tok.id_to_token(i) + "\n" for i in range(tok.vocab_size)))
    sentencepiece = train_sentencepiece([corpus], 80, directory / "sp" / "sp.model")
    bpe = train_byte_level_bpe(docs, directory / "bpe" / "tokenizer.json")
    return {"tokenizer.json": wordpiece, "vocab.txt": vocab, "bpe": bpe, "sentencepiece": sentencepiece}

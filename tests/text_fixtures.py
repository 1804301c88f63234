"""Small text corpora and tokenizers for the text tests: long made-up words so WordPiece has to split them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SYLLABLES = ("un be liev able hap pi ness to ken iza tion re mark cat dog run ning "
             "walk ed ship yard light house").split()  # fmt: skip


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(count)]


def write_corpus(path: Path, num_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (5, 40)) -> list[str]:
    """A JSONL corpus {"text": ...}; returns the documents."""
    rng = np.random.default_rng(seed)
    vocab = make_words(rng, 300)
    docs = [" ".join(rng.choice(vocab, size=rng.integers(*words_per_doc))) for _ in range(num_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def train_byte_level_bpe(docs: list[str], path: Path) -> Path:
    """A lower-casing GPT-2 style byte-level BPE tokenizer.json with the BERT specials first ([PAD]=0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
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

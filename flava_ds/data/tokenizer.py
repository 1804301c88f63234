"""One tokenizer interface over a `tokenizers` tokenizer.json, a BERT vocab.txt and a sentencepiece model.

Everything downstream (preprocessing, MLM masking, the model's vocabulary size) only needs token ids,
the special ids and which tokens start a word, so the three file kinds are reduced to exactly that.
Sequences are always `[CLS] tokens [SEP]`, added here rather than by the file's own post-processor so
that all kinds behave the same. `Tokenizer.to_tokenizers` gives a `tokenizers` tokenizer that encodes exactly
like `encode` (what an exported `transformers` directory ships).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from flava_ds.shard_format import file_sha256

# Accepted spellings of each special role, BERT style first.
SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SENTENCEPIECE_WORD_MARK = "▁"
# the name a copy of each kind gets in a checkpoint or export (Tokenizer.from_file finds it in that directory)
CANONICAL_NAMES = {"tokenizer.json": "tokenizer.json", "vocab.txt": "vocab.txt", "sentencepiece": "tokenizer.model"}


class TokenizerError(ValueError):
    """A tokenizer file that cannot serve FLAVA (unknown kind, missing special token, [PAD] not 0)."""


def file_fingerprint(path: str | Path) -> str:
    """Short sha256 of a file: identifies the exact tokenizer in manifests and checkpoints."""
    return file_sha256(path)[:16]


def _bert_wordpiece(vocab_path: Path, lowercase: bool) -> HFTokenizer:
    """A BERT WordPiece tokenizer built from vocab.txt, equivalent to BertTokenizerFast."""
    tok = HFTokenizer(models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    present = [name for name in BERT_SPECIALS if tok.token_to_id(name) is not None]
    tok.add_special_tokens(present)
    return tok


class _HFBackend:
    """tokenizer.json / vocab.txt through the `tokenizers` library."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.tok.no_padding()
        self.tok.no_truncation()
        if self.tok.decoder is None and isinstance(self.tok.model, models.WordPiece):
            # Without it decode() would print "##" pieces as separate words.
            self.tok.decoder = decoders.WordPiece(prefix=self.tok.model.continuing_subword_prefix)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str:
        return self.tok.id_to_token(idx) or ""

    def extra_special_ids(self) -> set[int]:
        return {idx for idx, added in self.tok.get_added_tokens_decoder().items() if added.special}

    def to_tokenizers(self) -> HFTokenizer:
        return HFTokenizer.from_str(self.tok.to_str())

    def word_rule(self) -> tuple[str, str]:
        """How a token's text tells a word boundary: ("prefix"|"marker"|"suffix"|"none", symbol)."""
        model = self.tok.model
        prefix = getattr(model, "continuing_subword_prefix", None)
        if prefix:
            return "prefix", prefix
        suffix = getattr(model, "end_of_word_suffix", None)
        if suffix:
            return "suffix", suffix
        pre = self.tok.pre_tokenizer
        pre_name = type(pre).__name__ if pre is not None else ""
        if pre_name == "ByteLevel" or isinstance(self.tok.decoder, decoders.ByteLevel):
            return "marker", "Ġ"
        if pre_name == "Metaspace" or isinstance(self.tok.decoder, decoders.Metaspace):
            return "marker", SENTENCEPIECE_WORD_MARK
        return "none", ""


class _SentencePieceBackend:
    """A sentencepiece .model; specials are its user-defined (or pad/unk/bos/eos) pieces."""

    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        idx = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces: check the round trip.
        return idx if self.sp.id_to_piece(idx) == token else None

    def id_to_token(self, idx: int) -> str:
        return self.sp.id_to_piece(idx)

    def extra_special_ids(self) -> set[int]:
        return {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def to_tokenizers(self) -> HFTokenizer:
        """transformers' own sentencepiece conversion, which follows the model's normalizer spec."""
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import SpmConverter

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
            vocab: list | dict = [(piece.piece, piece.score) for piece in proto.pieces]
        else:  # BPE: merges are regenerated from the piece scores
            vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
        return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)

    def word_rule(self) -> tuple[str, str]:
        return "marker", SENTENCEPIECE_WORD_MARK


class Tokenizer:
    """Uniform tokenizer: `encode` gives `[CLS] ... [SEP]`, pad id is always 0.

    Build it with `Tokenizer.from_file(path)`; `path` is a tokenizer.json, a BERT vocab.txt,
    a sentencepiece .model, or a directory holding one of them.
    """

    def __init__(self, backend: _HFBackend | _SentencePieceBackend, path: Path, lowercase: bool):
        self._backend = backend
        self.path = path
        self.lowercase = lowercase
        self.kind = {".json": "tokenizer.json", ".txt": "vocab.txt", ".model": "sentencepiece"}[path.suffix]
        ids = {role: self._find_special(role) for role in SPECIAL_NAMES}
        if ids["pad"] != 0:
            raise TokenizerError(
                f"{path}: pad token {backend.id_to_token(ids['pad'])!r} has id {ids['pad']}, but FLAVA needs "
                "pad id 0 (the text encoder and attention masks assume it); retrain or reorder the vocabulary"
            )
        self.pad_id, self.unk_id, self.cls_id = ids["pad"], ids["unk"], ids["cls"]
        self.sep_id, self.mask_id = ids["sep"], ids["mask"]
        self.vocab_size = backend.vocab_size()
        self.special_ids = frozenset(ids.values()) | frozenset(backend.extra_special_ids())

    @classmethod
    def from_file(cls, path: str | Path, lowercase: bool = True) -> Tokenizer:
        """Load any supported file; `lowercase` only applies to vocab.txt (the others carry their own)."""
        path = Path(path)
        if path.is_dir():
            path = cls._file_in_dir(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            try:
                backend = _HFBackend(HFTokenizer.from_file(str(path)))
            except Exception as exc:
                raise TokenizerError(f"{path}: not a readable `tokenizers` tokenizer.json: {exc}") from exc
        elif path.suffix == ".txt":
            backend = _HFBackend(_bert_wordpiece(path, lowercase))
        elif path.suffix == ".model":
            try:
                backend = _SentencePieceBackend(path)
            except Exception as exc:
                raise TokenizerError(f"{path}: not a readable sentencepiece model: {exc}") from exc
        else:
            raise TokenizerError(f"{path}: unknown tokenizer kind; expected tokenizer.json, vocab.txt or .model")
        return cls(backend, path, lowercase)

    @staticmethod
    def _file_in_dir(directory: Path) -> Path:
        for pattern in ("tokenizer.json", "vocab.txt", "*.model"):
            found = sorted(directory.glob(pattern))
            if found:
                return found[0]
        raise TokenizerError(f"{directory}: no tokenizer.json, vocab.txt or *.model in this directory")

    def __reduce__(self):
        # Worker processes rebuild from the file: cheap, and sentencepiece objects do not pickle everywhere.
        return Tokenizer.from_file, (self.path, self.lowercase)

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path}, vocab_size={self.vocab_size}, sha256={self.fingerprint})"

    def _find_special(self, role: str) -> int:
        for name in SPECIAL_NAMES[role]:
            idx = self._backend.token_to_id(name)
            if idx is not None:
                return idx
        raise TokenizerError(
            f"{self.path}: no {role} token; expected one of {list(SPECIAL_NAMES[role])} in the vocabulary"
        )

    @cached_property
    def fingerprint(self) -> str:
        return file_fingerprint(self.path)

    def special_tokens(self) -> dict[str, str]:
        """Each special role's token text: {"pad": "[PAD]", "unk": ..., "cls": ..., "sep": ..., "mask": ...}."""
        return {role: self.id_to_token(getattr(self, f"{role}_id")) for role in SPECIAL_NAMES}

    def to_tokenizers(self) -> HFTokenizer:
        """A standalone `tokenizers` tokenizer giving the ids of `encode(text)`, and truncated to max_length those of
        `encode(text, max_length)`: [CLS] and [SEP] come from its post-processor, which truncation leaves room for.
        Sentencepiece goes through transformers' converter: the same ids, except that a special piece written in
        the text ("a [MASK] b") may get another word-boundary piece next to it."""
        tok = self._backend.to_tokenizers()
        cls, sep = self.id_to_token(self.cls_id), self.id_to_token(self.sep_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, self.cls_id), (sep, self.sep_id)],
        )
        tok.no_padding()
        tok.no_truncation()
        return tok

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`[CLS] tokens [SEP]`, cut to `max_length` ids (the [SEP] is kept)."""
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
        body = None if max_length is None else max_length - 2
        return [[self.cls_id, *ids[:body], self.sep_id] for ids in self.encode_raw(texts)]

    def encode_raw(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without [CLS]/[SEP] and without truncation (what the text corpus stores)."""
        return self._backend.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the non-special ids."""
        return self._backend.decode([int(i) for i in ids if int(i) not in self.special_ids])

    def id_to_token(self, idx: int) -> str:
        return self._backend.id_to_token(int(idx))

    @cached_property
    def _word_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Per vocabulary id: does this token begin a word / end a word (so the next one begins)."""
        rule, symbol = self._backend.word_rule()
        tokens = [self._backend.id_to_token(i) for i in range(self.vocab_size)]
        begins = np.ones(self.vocab_size, dtype=bool)
        ends = np.zeros(self.vocab_size, dtype=bool)
        if rule == "prefix":
            begins = np.array([not t.startswith(symbol) for t in tokens])
        elif rule == "marker":
            begins = np.array([t.startswith(symbol) for t in tokens])
        elif rule == "suffix":
            begins[:] = False
            ends = np.array([t.endswith(symbol) for t in tokens])
        specials = np.fromiter(self.special_ids, dtype=np.int64)
        begins[specials] = True
        ends[specials] = True
        return begins, ends

    def word_starts(self, ids: Sequence[int] | np.ndarray) -> list[bool]:
        """True where a token starts a new word (for whole-word masking); specials are always starts."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return []
        begins, ends = self._word_tables
        starts = begins[ids].copy()
        starts[0] = True
        starts[1:] |= ends[ids[:-1]]
        return starts.tolist()

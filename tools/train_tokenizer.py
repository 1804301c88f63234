"""Train an uncased WordPiece tokenizer.json or a sentencepiece model from JSONL / plain text corpora.

Both come out with the specials FLAVA's loaders expect: [PAD]=0, [UNK], [CLS], [SEP], [MASK]
(see `flava_ds.data.tokenizer`). Documents are read like `preprocess/text.py` reads them, and
skipped documents (empty, invalid UTF-8, bad JSON) are counted on stderr.

Usage::

    python tools/train_tokenizer.py --input corpus/*.jsonl --type wordpiece --vocab-size 30522 \\
        --output tokenizer.json
    python tools/train_tokenizer.py --input books.txt --type sentencepiece --vocab-size 32000 --output sp.model
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from flava_ds.data.tokenizer import BERT_SPECIALS
from preprocess.readers import expand_inputs
from preprocess.text import check_inputs, read_documents


def _texts(files: Sequence[str | Path], json_key: str, skipped: Counter) -> Iterator[str]:
    for doc in read_documents(files, json_key):
        if doc.skip:
            skipped[doc.skip] += 1
        else:
            yield doc.text


def _report_skips(skipped: Counter) -> None:
    if skipped:
        print(f"[train_tokenizer] skipped documents: {dict(skipped)}", file=sys.stderr)


def train_wordpiece(
    files: Sequence[str | Path], vocab_size: int, output: str | Path, json_key: str = "text", min_frequency: int = 2
) -> Path:
    """An uncased BERT-style WordPiece tokenizer.json (BERT normalizer and pre-tokenizer, [PAD]=0)."""
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIALS), show_progress=False
    )
    skipped: Counter = Counter()
    tok.train_from_iterator(_texts(files, json_key, skipped), trainer)
    _report_skips(skipped)
    # Lets other libraries (transformers) add [CLS]/[SEP] like BERT; flava_ds adds them itself.
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    return output


def train_sentencepiece(
    files: Sequence[str | Path],
    vocab_size: int,
    output: str | Path,
    json_key: str = "text",
    model_type: str = "unigram",
) -> Path:
    """A case-folded sentencepiece model: [PAD]=0, [UNK]=1, then [CLS], [SEP], [MASK] as user-defined pieces."""
    output = Path(output)
    if output.suffix != ".model":
        raise ValueError(f"--output {output}: a sentencepiece model file must end in .model")
    output.parent.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    spm.SentencePieceTrainer.train(
        # sentencepiece drops "sentences" longer than max_sentence_length: feed it lines, not documents.
        sentence_iterator=(
            line for text in _texts(files, json_key, skipped) for line in text.splitlines() if line.strip()
        ),
        max_sentence_length=1 << 16,
        model_prefix=str(output.with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        unk_piece="[UNK]",
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        normalization_rule_name="nmt_nfkc_cf",
        hard_vocab_limit=False,  # small corpora get a smaller vocabulary instead of an error
        minloglevel=2,
    )
    _report_skips(skipped)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="inputs as preprocess/text.py reads them")
    parser.add_argument("--type", choices=("wordpiece", "sentencepiece"), default="wordpiece")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--output", required=True, help="tokenizer.json (wordpiece) or NAME.model (sentencepiece)")
    parser.add_argument("--text-field", "--json-key", dest="json_key", default="text", help="field holding the text")
    args = parser.parse_args(argv)
    try:
        files = expand_inputs(args.input)
        check_inputs(files, args.json_key)
    except ValueError as e:
        parser.error(str(e))
    train = train_wordpiece if args.type == "wordpiece" else train_sentencepiece
    path = train(files, args.vocab_size, args.output, json_key=args.json_key)
    print(f"[train_tokenizer] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every input reader yields, and how input files are opened.

A record is a dict of fields (values as stored: ``str``, ``bytes``, numbers, lists, nested dicts such as the
Hugging Face ``Image`` struct ``{"bytes", "path"}``), or a ``BadRecord`` for an input unit that could not be
parsed: readers never raise on one bad record, the converters count it. Every line-oriented format may be
compressed (``COMPRESSIONS``, chosen by suffix).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BAD_RECORD = "bad_record"  # the skip reason of a BadRecord in every manifest
COMPRESSIONS: dict[str, Callable[[str], IO[bytes]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zst": lambda path: _zstd_open(path),
}


class InputError(ValueError):
    """The input as a whole cannot be read as asked (format, missing field): one line, before any heavy work."""


@dataclass(frozen=True)
class BadRecord:
    """An input record that could not be parsed; converters count it as skip reason ``bad_record``."""

    where: str
    error: str


Record = tuple[str, "dict[str, Any] | BadRecord"]


def _zstd_open(path: str) -> IO[bytes]:
    import zstandard

    return io.BufferedReader(zstandard.open(path, "rb"))  # the raw reader cannot iterate lines


def split_compression(path: str) -> tuple[str, str | None]:
    """('data.jsonl', '.zst') for 'data.jsonl.zst'; (path, None) when it is not compressed."""
    lower = path.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, None


def open_input(path: str | Path) -> IO[bytes]:
    """A binary reader of the file's contents, decompressed by its suffix."""
    _, compression = split_compression(str(path))
    return COMPRESSIONS[compression](str(path)) if compression else open(path, "rb")


def decode_text(raw: bytes) -> str:
    """UTF-8 with surrogateescape: invalid bytes survive as lone surrogates, so a converter can count a
    non-UTF-8 field as its own skip reason instead of losing the whole record."""
    return raw.decode("utf-8", "surrogateescape")


def is_valid_utf8(text: str) -> bool:
    """False for text carrying lone surrogates (invalid bytes read by ``decode_text``, or JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

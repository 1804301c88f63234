"""Readers of the line-oriented input formats: JSON lines, CSV / TSV, and COCO caption annotations (one JSON
document, read whole). Each yields ``(source id, record)`` (``preprocess/input_records.py``); a line that cannot
be parsed is a ``BadRecord``, never an exception.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from preprocess.input_records import BadRecord, InputError, Record, decode_text, open_input

LINE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
COCO_KEYS = ("info", "licenses", "images", "annotations", "categories")


def is_coco(path: str) -> bool:
    """A COCO annotation file is one JSON object whose first key is one of COCO's top-level keys (it is often a
    single line, so the first line alone cannot tell it from JSON lines; ``--format jsonl`` overrides)."""
    with open_input(path) as f:
        head = f.read(4096).decode("utf-8", "replace")
    match = re.match(r'\s*\{\s*"([^"]*)"', head)
    return bool(match) and match.group(1) in COCO_KEYS


def read_jsonl(path: str) -> Iterator[Record]:
    """(``file:line``, object or BadRecord); blank lines are not records."""
    name = Path(path).name
    with open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(decode_text(raw))
            except json.JSONDecodeError as e:
                yield where, BadRecord(f"{path}:{lineno}", f"invalid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield where, BadRecord(f"{path}:{lineno}", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield where, obj


def read_delimited(path: str, delimiter: str, columns: Sequence[str] | None = None) -> Iterator[Record]:
    """CSV (quoted fields as the csv module reads them) or TSV (no quoting); the first row names the fields
    unless ``columns`` are given (files without a header)."""
    name = Path(path).name
    with open_input(path) as raw, io.TextIOWrapper(raw, "utf-8", "surrogateescape", newline="") as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        rows = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns else next(rows, None)
        if not header or header == [""]:
            raise InputError(f"{path}: empty file, expected a header row naming the fields (or pass --columns)")
        for row in rows:
            lineno = rows.line_num
            if not any(v.strip() for v in row):
                continue
            where = f"{name}:{lineno}"
            if len(row) != len(header):
                yield where, BadRecord(f"{path}:{lineno}", f"{len(row)} fields, expected {len(header)} ({header})")
                continue
            yield where, dict(zip(header, row))


def read_coco(path: str) -> Iterator[Record]:
    """One record per image of a COCO caption file: ``{"id", "file_name", "captions": [...]}`` (in the order of
    ``images``); an annotation naming an image that is not listed is a BadRecord."""
    name = Path(path).name
    with open_input(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not a COCO annotation file: invalid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: a COCO caption file holds 'images' and 'annotations' lists")
    captions: dict[Any, list[str]] = {}
    known = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for n, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or ann.get("image_id") not in known:
            yield f"{name}:annotation {n}", BadRecord(f"{path}: annotation {n}", "no image with its image_id")
            continue
        captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "file_name" not in img:
            yield f"{name}:image {n}", BadRecord(f"{path}: image {n}", "no file_name")
            continue
        record = {**img, "id": str(img.get("id")), "captions": captions.get(img.get("id"), [])}
        yield f"{name}:{img.get('id')}", record

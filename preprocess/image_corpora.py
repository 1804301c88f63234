"""The inputs of the image-only converter as records ``(sample id, image path or bytes, label)``: class folders,
``path label`` list files and tables (Parquet / Arrow / save_to_disk), with their labels, their count where known
up front, and the checks that refuse a wrong input before the codebook loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from preprocess.image_decoding import SkipSample, path_under_root
from preprocess.input_records import BadRecord, InputError, decode_text, open_input
from preprocess.readers import Block, detect_format, input_blocks
from preprocess.table_readers import (
    TABLE_SUFFIXES,
    check_columns,
    class_label_names,
    hf_dataset,
    table_files,
    table_schema,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGE_FIELD_TYPES = "an Image struct {bytes, path}, encoded image bytes or a path string"
LABEL_FIELD_TYPES = "integers (a ClassLabel) or class-name strings"

# one input record as the workers take it: (sample id, image path under the image root or encoded bytes, label)
ImageRecord = tuple[str, str | bytes, int]


@dataclass(frozen=True)
class LabelSpace:
    """How an input's label values become integer labels.

    ``classes``: the class ids in label order (folder names, sorted label names, ClassLabel names); a string
    label is its class's index. An integer indexes ``classes`` when ``indexed`` (a ClassLabel: out of range is
    a bad record, e.g. the -1 of unlabelled splits), else it is used as given (list files, plain integer
    columns; ``integers``: those seen)."""

    classes: tuple[str, ...] = ()
    indexed: bool = False
    integers: frozenset[int] = frozenset()

    @classmethod
    def scan(cls, values: Iterable[Any]) -> LabelSpace:
        """Names indexed in sorted order (as list files always were), integers as given; other values are
        ignored here and become bad records when their record is read."""
        names: set[str] = set()
        integers: set[int] = set()
        for value in values:
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                integers.add(value)
        return cls(tuple(sorted(names)), False, frozenset(integers))

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def label(self, value: Any) -> int:
        """The integer label of a label value; ValueError (a bad record) for a value that names no class."""
        if isinstance(value, str):
            if value not in self._index:
                raise ValueError(f"label {value!r} is not one of the input's classes")
            return self._index[value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"label {value!r} is neither an integer nor a class name")
        if self.indexed and not 0 <= value < len(self.classes):
            raise ValueError(f"label {value} is outside the {len(self.classes)} classes")
        return value


@dataclass(frozen=True)
class Corpus:
    """An input as the converter reads it: records in order, their count where known up front (the progress
    bar's total), its labels, and the folder that path images are relative to."""

    records: Iterable[ImageRecord | BadRecord]
    total: int | None
    labels: LabelSpace
    root: Path


def input_kind(paths: Sequence[str]) -> str:
    """``folders`` (one class-folder root), ``list`` (``path label`` files) or the table format of the inputs."""
    kinds = {_kind_of(path) for path in paths}
    if len(kinds) > 1:
        raise InputError(f"--input mixes {sorted(kinds)}; convert each kind in its own run")
    kind = kinds.pop()
    if kind == "folders" and len(paths) > 1:
        raise InputError(f"--input: one class-folder root per run, got {len(paths)}")
    return kind


def _kind_of(path: str) -> str:
    """A directory's kind is that of the first image or table file a sorted walk meets: this stops within the
    first class folder of ImageNet instead of listing the whole tree."""
    local = Path(path)
    if local.is_file():
        return detect_format([path]) if local.suffix.lower() in TABLE_SUFFIXES else "list"
    if not local.is_dir():
        raise InputError(f"--input {path}: not a local file or directory")
    if (local / "dataset_dict.json").is_file():
        return "hf"  # all splits of a save_to_disk DatasetDict: hf_dataset names them, to pick one
    for _, dirnames, filenames in os.walk(local):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                return "folders"
            if name.lower().endswith(tuple(TABLE_SUFFIXES)):
                return detect_format([path])
    raise InputError(f"{path}: no images (root/<class>/<image>) and no .parquet/.arrow tables")


def _is_image_type(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return any(dtype.field(i).name in ("bytes", "path") for i in range(dtype.num_fields))
    return any(check(dtype) for check in (pa.types.is_binary, pa.types.is_large_binary, _is_string_type))


def _is_string_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):  # pandas categories
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_label_type(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or _is_string_type(dtype)


def check_table_fields(paths: Sequence[str], fmt: str, image_field: str, label_field: str) -> None:
    """Every table holds both fields, of types they can be read as (schemas only, no rows): otherwise one line
    naming the file, its columns and the flag to set, before anything heavy runs."""
    checks = (
        ("--image-field", image_field, _is_image_type, IMAGE_FIELD_TYPES),
        ("--label-field", label_field, _is_label_type, LABEL_FIELD_TYPES),
    )
    for path in paths:
        if fmt == "hf":
            schemas = [(path, hf_dataset(path).data.schema)]
        else:
            schemas = [(file, table_schema(file)) for file in table_files(path)]
        for where, schema in schemas:
            for flag, field, accepts, expected in checks:
                try:
                    check_columns(where, schema, [field])
                except InputError as e:
                    raise InputError(f"{e} (set {flag})") from None
                dtype = schema.field(field).type
                if not accepts(dtype):
                    raise InputError(f"{where}: column {field!r} is {dtype}, not {expected} (set {flag})")


def folder_corpus(root: Path) -> Corpus:
    """root/<class>/<image> (sorted, so record order is stable); labels index the sorted class folder names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    records: list[ImageRecord] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    rel = (Path(dirpath) / fname).relative_to(root).as_posix()
                    records.append((rel, rel, label))
    return Corpus(records, len(records), LabelSpace(tuple(classes), indexed=True), root)


def _list_label(text: str) -> int | str:
    """A list file's label: an integer where it reads as one, else a class name."""
    try:
        return int(text)
    except ValueError:
        return text


def list_corpus(paths: Sequence[str], root: Path) -> Corpus:
    """``relative/path label`` lines (optionally compressed); the label is an integer (used as given) or a class
    name (the names of all the files are indexed in sorted order)."""
    lines: list[tuple[str, list[str]]] = []
    for path in paths:
        with open_input(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_text(raw).strip()
                if line:
                    lines.append((f"{path}:{lineno}", line.rsplit(maxsplit=1)))
    labels = LabelSpace.scan(_list_label(parts[1]) for _, parts in lines if len(parts) == 2)
    records = [
        (parts[0], parts[0], labels.label(_list_label(parts[1])))
        if len(parts) == 2
        else BadRecord(where, "expected 'path label'")
        for where, parts in lines
    ]
    return Corpus(records, len(records), labels, root)


def table_corpus(paths: Sequence[str], fmt: str, image_field: str, label_field: str, root: Path) -> Corpus:
    """Rows of Parquet / Arrow / save_to_disk inputs, read as they are converted. A ClassLabel's names are the
    classes; other labels are scanned first (that column alone) for their names and count."""
    found = {tuple(class_label_names(path, label_field) or ()) for path in paths}
    if len(found) > 1:
        raise InputError(f"--input: the {label_field!r} ClassLabel names differ between the inputs; convert each alone")
    names = found.pop()
    blocks = input_blocks(paths, fmt, [image_field, label_field])
    if names:
        labels = LabelSpace(names, indexed=True)
        rows = [block.rows for block in blocks]
        total = None if None in rows else sum(rows)
    else:
        values = [
            record.get(label_field) if isinstance(record, dict) else None
            for block in input_blocks(paths, fmt, [label_field])
            for _, record in block.read()
        ]
        labels, total = LabelSpace.scan(values), len(values)
    return Corpus(_table_records(blocks, image_field, label_field, labels), total, labels, root)


def _table_records(
    blocks: Sequence[Block], image_field: str, label_field: str, labels: LabelSpace
) -> Iterator[ImageRecord | BadRecord]:
    for block in blocks:
        for source_id, record in block.read():
            if isinstance(record, BadRecord):
                yield record
                continue
            try:
                payload = (
                    source_id,
                    _table_image(record.get(image_field), image_field),
                    labels.label(record.get(label_field)),
                )
            except ValueError as e:
                payload = BadRecord(source_id, str(e))
            yield payload


def _table_image(value: Any, field: str) -> str | bytes:
    """The encoded bytes or the path a table cell holds (of an HF Image struct: its bytes, else its path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, str)) and value:
        return value
    raise ValueError(f"no image in {field!r}")


def check_image_root(records: Sequence[ImageRecord | BadRecord], root: Path) -> None:
    """A wrong image root makes every path image a missing file: found from the first records, it is an error
    before the codebook loads instead of a run that skips everything."""
    paths = [r[1] for r in records if not isinstance(r, BadRecord) and isinstance(r[1], str)]
    for rel in paths:
        try:
            if path_under_root(root, rel).is_file():
                return
        except SkipSample:
            continue
    if paths:
        raise InputError(
            f"none of the first {len(paths)} image paths exists under the image root {root} (e.g. {paths[0]!r}); "
            "set --image-root to the folder they are relative to"
        )

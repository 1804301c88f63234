"""Reader of webdataset tars as img2dataset writes them (``key.jpg`` + ``key.txt`` + ``key.json``): local paths
and ``pipe:`` URLs, read with the ``webdataset`` package. A record holds every member of a key by extension
(``txt`` decoded) and the fields of its ``.json``; the source id is ``<tar name>/<key>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preprocess.input_records import BadRecord, Record, decode_text

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the members img2dataset writes an image as


def read_tar(url: str) -> Iterator[Record]:
    """The samples of one webdataset tar: ``(<tar name>/<key>, {extension: value, **json fields})``.

    A damaged tar yields its samples up to the damage and then one BadRecord naming the tar."""
    import webdataset as wds

    name = Path(url.split()[-1] if url.startswith("pipe:") else url).name
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    for sample in wds.tarfile_samples([{"url": url}], handler=stop):
        key = sample["__key__"]
        where = f"{name}/{Path(key).name}"
        yield where, _wds_record(sample, where)
    if errors:
        yield f"{name}/<end>", BadRecord(url, f"unreadable tar: {errors[0]}")


def _wds_record(sample: dict[str, Any], where: str) -> dict[str, Any] | BadRecord:
    record: dict[str, Any] = {}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        record[ext] = decode_text(value) if ext == "txt" else value
    if "json" in record:
        try:
            meta = json.loads(decode_text(record.pop("json")))
        except json.JSONDecodeError as e:
            return BadRecord(where, f".json member: invalid JSON: {e}")
        if isinstance(meta, dict):
            record.update({k: v for k, v in meta.items() if k not in record})
    return record


def tar_rows(url: str) -> int | None:
    """Samples in a local tar from the ``<stem>_stats.json`` img2dataset writes beside it (None without one)."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

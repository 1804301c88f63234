"""The facts of the shard format (docs/DESIGN.md §2) that its writer, ``preprocess/``, and its readers,
``flava_ds/data/`` and training, must agree on: manifest names and their checks, file checksums, atomic writes,
column names and the ignore index of the targets.

Kept in one module so that the two sides cannot drift apart, and free of project imports, torch and pyarrow so
that a converter can import it and still refuse bad input within about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # the target of a position that no loss reads (MLM, MIM, MMM labels)

TMP_PREFIX = ".tmp-"  # files not yet renamed into place: never listed in a manifest
MANIFEST_GLOB = "manifest*.json"
CLASSES_FILE = "classes.json"  # labelled image shards: {class name: label}

# Columns of the Arrow image shards (image-only and image-text).
ID = "id"
IMAGE = "image"
CODEBOOK_TOKENS = "codebook_tokens"
CODEBOOK_TOKENS_FLIPPED = "codebook_tokens_flipped"
LABEL = "label"
CAPTIONS = "captions"
INPUT_IDS = "input_ids"  # one token list per caption, cut to the manifest's --max-length


class ShardError(ValueError):
    """A shard directory that cannot be read as recorded (names the offending file)."""


def manifest_name(num_shards: int, shard_index: int) -> str:
    """The manifest of one converter machine: ``manifest.json`` for a single machine."""
    return "manifest.json" if num_shards == 1 else f"manifest-node{shard_index:03d}-of-{num_shards:03d}.json"


def manifest_paths(directory: Path) -> list[Path]:
    """Every converter machine's manifest in `directory`, in name (= machine) order."""
    return sorted(directory.glob(MANIFEST_GLOB))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: the checksum manifests record and tokenizer fingerprints cut."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A written file's manifest entry, what ``check_file`` checks it against later."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


def check_file(path: Path, entry: dict, verify_checksums: bool) -> None:
    """A file against its manifest entry: present, the recorded size, and (on request) the recorded sha256."""
    if not path.is_file():
        raise ShardError(f"{path}: file listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise ShardError(f"{path}: {size} bytes, the manifest records {entry['size']} (truncated or replaced?)")
    if verify_checksums and file_sha256(path) != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from the manifest (corrupt file)")


def read_manifests(directory: Path) -> list[dict]:
    """Every converter machine's manifest of `directory` (each with its file as ``_path``), checked to agree."""
    paths = manifest_paths(directory)
    if not paths:
        raise ShardError(f"{directory}: no manifest.json (not a preprocessing output directory?)")
    manifests = []
    for path in paths:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: unreadable manifest: {e}") from None
        if not manifest.get("complete"):
            raise ShardError(f"{path}: the conversion did not finish (complete=false); re-run it to resume")
        manifest["_path"] = str(path)
        manifests.append(manifest)
    first = manifests[0]
    for m in manifests[1:]:
        for key in ("kind", "fingerprints", "num_shards"):
            if m.get(key) != first.get(key):
                raise ShardError(
                    f"{m['_path']}: {key} differs from {first['_path']} ({m.get(key)} vs {first.get(key)})"
                )
    nodes = sorted(m.get("shard_index", 0) for m in manifests)
    if nodes != list(range(first.get("num_shards", 1))):
        raise ShardError(f"{directory}: manifests of machines {nodes} present, expected 0..{first['num_shards'] - 1}")
    return manifests


def publish(tmp: str | Path, final: str | Path) -> None:
    """Flush a finished temporary file to disk, then rename it into place: readers see all of it or none."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling then rename it into place, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    publish(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Manifests and sidecars: sorted keys, one-space indent, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

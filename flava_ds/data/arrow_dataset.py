"""Memory-mapped random access to a directory of Arrow IPC shards written by ``preprocess/``.

The directory holds one manifest per converter machine (``manifest.json`` or
``manifest-node{n}-of-{N}.json``) listing its shards with sizes and checksums. Opening checks that
every machine finished, that every listed file exists with its recorded size (and, on request, its
sha256) and that its row count matches, so a truncated or missing shard fails at start-up with its
name rather than mid-training. The offsets of every variable-length column (ids, JPEG bytes, captions,
caption token lists) are checked at open too, vectorised (about 0.1 s per million rows, see
docs/RELIABILITY.md): a damaged offset would otherwise make a loader worker read out of bounds and die
naming nothing. Rows are addressed by a global index over the shards in shard order.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from flava_ds.shard_format import INPUT_IDS, ShardError, check_file, read_manifests


class ArrowShards:
    """All rows of a shard directory, read lazily through memory maps (safe to fork or pickle)."""

    def __init__(self, directory: str | Path, verify_checksums: bool = False):
        self.directory = Path(directory)
        manifests = read_manifests(self.directory)
        self.kind: str = manifests[0]["kind"]
        self.fingerprints: dict[str, str] = manifests[0].get("fingerprints", {})
        self.args: dict[str, Any] = manifests[0].get("args", {})
        # each shard with the caption length its machine's converter cut to (None where not recorded)
        shards = sorted(
            ((s, m.get("args", {}).get("max_length")) for m in manifests for s in m["shards"]),
            key=lambda item: item[0]["index"],
        )
        self.files: list[Path] = []
        counts: list[int] = []
        schema = None
        for shard, max_length in shards:
            for entry in shard["files"]:
                path = self.directory / entry["name"]
                check_file(path, entry, verify_checksums)
                reader = self._open(path)
                rows = check_batches(path, reader, max_length)
                if rows != shard["samples"]:
                    raise ShardError(f"{path}: {rows} rows, the manifest records {shard['samples']}")
                if schema is None:
                    schema = reader.schema
                elif not reader.schema.equals(schema, check_metadata=False):
                    raise ShardError(f"{path}: schema differs from {self.files[0]}")
                self.files.append(path)
                counts.append(rows)
        if schema is None:
            raise ShardError(f"{self.directory}: the manifests list no shards")
        self.schema: pa.Schema = schema
        self.metadata = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._readers: dict[int, tuple[pa.ipc.RecordBatchFileReader, list[int]]] = {}
        self._pid = os.getpid()

    @staticmethod
    def _open(path: Path) -> pa.ipc.RecordBatchFileReader:
        try:
            return pa.ipc.open_file(pa.memory_map(str(path)))
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: not a readable Arrow IPC file: {e}") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def __len__(self) -> int:
        return self._starts[-1]

    def location(self, index: int) -> str:
        """Where row `index` is stored ("<shard file> row <r>"), for error messages."""
        file_index = bisect.bisect_right(self._starts, index) - 1
        return f"{self.files[file_index]} row {index - self._starts[file_index]}"

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def _reader(self, file_index: int) -> tuple[pa.ipc.RecordBatchFileReader, list[int]]:
        if self._pid != os.getpid():  # a forked DataLoader worker maps the files itself
            self._readers, self._pid = {}, os.getpid()
        if file_index not in self._readers:
            reader = self._open(self.files[file_index])
            sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
            self._readers[file_index] = (reader, np.concatenate([[0], np.cumsum(sizes)]).tolist())
        return self._readers[file_index]

    def row(self, index: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """One row: bytes for binary, str for strings, numpy arrays (zero-copy) for token lists, a list of them
        for a list of token lists (``input_ids`` of image-text shards: one per caption)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows in {self.directory}")
        file_index = bisect.bisect_right(self._starts, index) - 1
        reader, batch_starts = self._reader(file_index)
        local = index - self._starts[file_index]
        b = bisect.bisect_right(batch_starts, local) - 1
        batch = reader.get_batch(b)
        r = local - batch_starts[b]
        return {name: _value(batch.column(name), r) for name in (columns or self.column_names)}


def check_batches(path: Path, reader: pa.ipc.RecordBatchFileReader, max_length: int | None) -> int:
    """The file's row count, after checking every record batch's structure and variable-length offsets.

    Offsets must start at >= 0, never decrease and end within the values they index, at every nesting level
    (captions -> token lists); caption token lists must be at most `max_length` (the manifest's ``--max-length``;
    None for shards that do not record it)."""
    plan = []
    for i, field in enumerate(reader.schema):
        kind, depth = field.type, 0
        while (dtype := _offset_dtype(kind)) is not None:
            innermost = (
                not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or _offset_dtype(kind.value_type) is None
            )
            plan.append((i, field.name, depth, dtype, max_length if field.name == INPUT_IDS and innermost else None))
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
                break
            kind, depth = kind.value_type, depth + 1
    rows = 0
    for b in range(reader.num_record_batches):
        try:
            batch = reader.get_batch(b)
            batch.validate()  # buffer sizes; not the offsets' values, which a full validation scans slowly
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: record batch {b} is damaged: {e}") from None
        for i, name, depth, dtype, limit in plan:
            levels = [batch.column(i)]
            for _ in range(depth):
                levels.append(levels[-1].values)
            bad = _bad_offset(levels[-1], dtype, limit)
            if bad is not None:
                entry, what = bad
                where = []
                for outer in reversed(levels[:-1]):  # the entry's position at each level up: its row last
                    parent = int(np.searchsorted(outer.offsets.to_numpy(), entry, side="right")) - 1
                    where.append(f"entry {entry - int(outer.offsets[parent].as_py())}")
                    entry = parent
                inside = f" ({', '.join(reversed(where))})" if where else ""
                raise ShardError(
                    f"{path}: column {name!r} row {rows + entry}{inside}: {what} (a damaged shard: re-convert it "
                    "or restore it from a copy)"
                )
        rows += batch.num_rows
    return rows


def _offset_dtype(kind: pa.DataType) -> type[np.integer] | None:
    """The offsets' dtype of a variable-length column type (None for fixed-size ones)."""
    if pa.types.is_list(kind) or pa.types.is_binary(kind) or pa.types.is_string(kind):
        return np.int32
    if pa.types.is_large_list(kind) or pa.types.is_large_binary(kind) or pa.types.is_large_string(kind):
        return np.int64
    return None


def _bad_offset(column: pa.Array, dtype: type[np.integer], max_length: int | None) -> tuple[int, str] | None:
    """(row, what is wrong) for the first row whose offsets are invalid, else None. Offsets that start at >= 0,
    never decrease and end within the values are all in bounds, so the common case is four reductions."""
    buffers = column.buffers()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        extent = len(column.values)
    else:
        extent = 0 if buffers[2] is None else buffers[2].size
    offsets = np.frombuffer(buffers[1], dtype=dtype)[column.offset : column.offset + len(column) + 1]
    lengths = np.diff(offsets.astype(np.int64))
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
    if offsets[0] >= 0 and offsets[-1] <= extent and low >= 0 and (max_length is None or high <= max_length):
        return None
    starts, stops = offsets[:-1], offsets[1:]
    outside = (starts < 0) | (lengths < 0) | (stops > extent)
    if outside.any():
        row = int(np.argmax(outside))
        return row, f"offsets {int(starts[row])}..{int(stops[row])} outside the {extent} values stored"
    row = int(np.argmax(lengths > max_length))
    return row, f"{int(lengths[row])} entries, more than the manifest's max_length {max_length}"


def _value(column: pa.Array, r: int) -> Any:
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        return column.flatten().to_numpy()[r * size : (r + 1) * size]
    if pa.types.is_list(column.type):
        values = column[r].values
        if pa.types.is_list(values.type):  # one token list per caption
            offsets = values.offsets.to_numpy()
            flat = values.values.to_numpy()
            return [flat[offsets[j] : offsets[j + 1]] for j in range(len(values))]
        if pa.types.is_integer(values.type):
            return values.to_numpy()
    return column[r].as_py()

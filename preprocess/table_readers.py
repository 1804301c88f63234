"""Readers of tables: Parquet and Arrow IPC files or directories of them (a Hugging Face hub cache), and
``datasets.save_to_disk`` directories. Rows are read in record batches, only the columns asked for, and of
Parquet only the row groups holding the rows asked for; each yields ``(<name>:<row>, {column: value})``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from preprocess.input_records import InputError, Record

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
TABLE_FORMATS = ("parquet", "arrow", "hf")
BATCH_ROWS = 1024  # table rows decoded at a time


def directory_format(path: str) -> str:
    """``hf`` for a save_to_disk directory, else the format of the table files below it (InputError if none)."""
    local = Path(path)
    if (local / "dataset_info.json").is_file() or (local / "state.json").is_file():
        return "hf"
    for suffix, kind in TABLE_SUFFIXES.items():
        if any(local.rglob(f"*{suffix}")):
            return kind
    raise InputError(f"{path}: a directory with no .parquet or .arrow files and no datasets.save_to_disk layout")


def table_files(path: str) -> list[str]:
    """The .parquet / .arrow files of a file or directory (a hub cache holds them in nested folders), sorted."""
    local = Path(path)
    if local.is_file():
        return [path]
    for suffix in TABLE_SUFFIXES:
        found = sorted(str(p) for p in local.rglob(f"*{suffix}") if not p.name.startswith("."))
        if found:
            return found
    return []


def _arrow_reader(path: str):
    """Record batches of an Arrow IPC file or stream (``datasets`` writes streams)."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.num_record_batches
    except pa.ArrowInvalid:
        source = pa.memory_map(path)
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader), None


def table_schema(path: str):
    """The Arrow schema of one table file (Parquet footer or Arrow header), without reading the rows."""
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        return pq.ParquetFile(path).schema_arrow
    return _arrow_reader(path)[0]


def table_rows_count(path: str) -> int | None:
    """Rows of a Parquet file from its footer (None for formats that do not record it up front)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.lower().endswith(".parquet") else None


def check_columns(path: str, schema, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r}; its columns are {schema.names}")


def read_table(
    path: str, columns: Sequence[str], name: str | None = None, start: int = 0, stop: int | None = None
) -> Iterator[Record]:
    """(``<name>:<row>``, {column: value}) for rows [start, stop) of a Parquet or Arrow file; only ``columns`` are
    read, and only the Parquet row groups holding those rows. ``name`` defaults to the file name (a directory
    input passes the path inside it)."""
    import pyarrow.parquet as pq

    name = name or Path(path).name
    first = 0  # the row the batches start at
    if path.lower().endswith(".parquet"):
        file = pq.ParquetFile(path)
        check_columns(path, file.schema_arrow, columns)
        bounds = [0]
        for g in range(file.metadata.num_row_groups):
            bounds.append(bounds[-1] + file.metadata.row_group(g).num_rows)
        groups = [g for g in range(len(bounds) - 1) if bounds[g + 1] > start and (stop is None or bounds[g] < stop)]
        first = bounds[groups[0]] if groups else 0
        batches = file.iter_batches(batch_size=BATCH_ROWS, columns=list(columns), row_groups=groups)
    else:
        schema, batches, _ = _arrow_reader(path)
        check_columns(path, schema, columns)
        batches = (b.select(list(columns)) for b in batches)
    row = first
    for batch in batches:
        if stop is not None and row >= stop:
            return
        skip = max(0, start - row)
        for offset, record in enumerate(batch.slice(skip).to_pylist(), row + skip):
            if stop is not None and offset >= stop:
                return
            yield f"{name}:{offset}", record
        row += batch.num_rows


def hf_dataset(path: str):
    """A ``datasets.save_to_disk`` directory as a Dataset (a DatasetDict must name its split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{path}: not a datasets.save_to_disk directory: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise InputError(f"{path}: holds splits {list(loaded)}; pass the split's directory ({path}/<split>)")
    return loaded


def read_hf(path: str, columns: Sequence[str]) -> Iterator[Record]:
    """Rows of a ``save_to_disk`` directory, undecoded (an ``Image`` column stays ``{"bytes", "path"}``)."""
    dataset = hf_dataset(path)
    check_columns(path, dataset.data.schema, columns)
    table = dataset.with_format("arrow").select_columns(list(columns))
    name = Path(path).name
    row = 0
    for batch in table.iter(batch_size=BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{name}:{row}", record
            row += 1


def class_label_names(path: str, column: str) -> list[str] | None:
    """The names of a ``datasets`` ``ClassLabel`` column (from a save_to_disk directory or the features a
    ``datasets``-written Parquet/Arrow file records), or None when the column is not a ClassLabel."""
    import datasets

    if Path(path).is_dir() and directory_format(path) == "hf":
        features = hf_dataset(path).features
    else:
        files = table_files(path)
        if not files:
            return None
        features = datasets.Features.from_arrow_schema(table_schema(files[0]))
    feature = features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

"""Machinery shared by every offline converter: the common flags, the output lock and the worker pool, and the
contract of a sharded run (input splitting, resume, manifests, skips) that ``preprocess/sharded_run.py`` keeps.

A converter turns a stream of input *records* into output *shards*. Shards are defined over the INPUT:
shard k holds what survives of records [k * shard_size, (k + 1) * shard_size) (``fixed_size_shards``), or
of the k-th input unit where the input comes in units already (one webdataset tar = one shard, so a
machine skips the other machines' tars without reading them). That makes everything below deterministic
and trivially resumable, independent of how many records are skipped:

* multi-machine runs (``--num-shards N --shard-index n``) process the shards k with k % N == n;
  their files have the same names and bytes as a single-machine run, so the union of all machines'
  outputs (in one directory or several) is exactly the single run;
* a shard is written to a temporary name and renamed into place (atomic), then recorded in the
  manifest (also written atomically). A re-run into the same output keeps every recorded shard whose
  files still have their recorded sizes, deletes stale temporaries, and redoes the rest. A re-run with
  other settings is refused (naming ``--overwrite``, which discards this machine's earlier output).

API for a converter (see ``preprocess/pairs.py`` for a full example; ``ShardedRun`` and ``EXIT_TOO_MANY_SKIPS``
are in ``preprocess/sharded_run.py``, ``ShardTask``, ``ShardResult`` and the shard cutters in
``preprocess/shards.py``)::

    parser = argparse.ArgumentParser(...)
    add_common_args(parser)                       # --output --workers --shard-size --num-shards
                                                  # --shard-index --max-skip-fraction --no-progress
                                                  # --overwrite
    args = parser.parse_args(argv)              # check_common_args(args) early gives a clean parser.error
    run = ShardedRun(args, kind="text", fingerprints={"tokenizer": tok.fingerprint},
                     file_suffixes=(".bin", ".idx"),         # the files making up one shard
                     resume_ignore=("workers",))             # args that may change between runs
    def convert(shard: ShardTask) -> ShardResult:
        # shard.index, shard.records: list of (record_index, payload)
        # write shard.tmp_path(".bin") / shard.tmp_path(".idx"); call shard.progress(n) as samples
        # are written (drives the progress bar); count each skip with result.skip(reason, where)
        result = ShardResult(samples=0)
        result.skip("empty_text", "corpus.jsonl:17")    # first few per reason: printed + in manifest
        result.samples = n_written
        return result
    return run.run(fixed_size_shards(records, args.shard_size), convert,   # returns the exit code
                   shard_rows=fixed_size_rows(total_records, args.shard_size))  # bar total + ETA if known

``run.run`` holds the output lock (``output_lock``), drives the progress bar (records/s), the resume logic
and the manifest; it returns 0, or
``EXIT_TOO_MANY_SKIPS`` when the skip fraction exceeds ``--max-skip-fraction`` (the manifest is
written first, with ``skip_check.passed = false``). Other helpers: ``worker_pool`` (a
multiprocessing pool, or in-process when workers == 0); atomic writes and checksums are
``flava_ds/shard_format.py``'s. Input readers (formats, decompression, the start-up probe) live in
``preprocess/readers.py``.

Output lock: one run per manifest at a time. ``output_lock(args)`` takes an exclusive, non-blocking
``flock`` on ``.lock-<manifest name>`` in the output directory (so the machines of a multi-machine run,
which write different manifests, do not exclude each other) and exits with one line naming the holder
(``pid@host``, recorded in the file) if another process has it. It is re-entrant within a process, so a
converter takes it early (before loading its tokenizer or codebook) and ``run.run`` nests inside; the kernel releases
it when the process ends, even on SIGKILL, so a lock file left behind never blocks a later run.

Manifest (``manifest.json``, or ``manifest-node{n}-of-{N}.json`` for multi-machine runs)::

    {"kind", "format_version", "args", "fingerprints", "complete",
     "inputs_seen", "samples_written", "skipped": {reason: count}, "skip_examples": {reason: [where]},
     "dropped": {reason: count},   # parts of kept samples left out (a multi-caption image's bad captions)
     "shards": [{"index", "first_record", "num_records", "samples", "skipped", "skip_examples", "dropped",
                 "files": [{"name", "size", "sha256"}]}],
     "skip_check": {"fraction", "max", "passed"}}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from flava_ds.shard_format import manifest_name

LOCK_PREFIX = ".lock-"
Settings = TypeVar("Settings")
_held_locks: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, nesting depth) held by this process


# ---- worker pool ----------------------------------------------------------------------------------


def _pool_worker_init(initializer: Callable | None, initargs: tuple) -> None:
    """Close the output locks a forked worker inherited: else a worker orphaned by a SIGKILLed parent
    would keep the lock held (flock belongs to the open file, which fork shares)."""
    for fd, _ in _held_locks.values():
        os.close(fd)
    _held_locks.clear()
    if initializer is not None:
        initializer(*initargs)


class _InlinePool:
    """Stands in for multiprocessing.Pool when workers == 0 (debugging, tiny runs)."""

    def __init__(self, initializer: Callable | None, initargs: tuple):
        if initializer is not None:
            initializer(*initargs)

    def imap(self, fn: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        return map(fn, iterable)


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """A process pool with an ordered ``imap``; fork keeps startup cheap (workers must not use torch)."""
    if workers <= 0:
        yield _InlinePool(initializer, initargs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=_pool_worker_init, initargs=(initializer, initargs))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


# ---- flags and the output lock -------------------------------------------------------------------


def converter_parser(
    module_doc: str, name: str, group: str, input_help: str
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A converter's parser (described by its module docstring's first paragraph, named as it is run) and its first
    flag group, holding ``--input``: one or more paths, globs and ``{a..b}`` ranges (``expand_inputs``)."""
    parser = argparse.ArgumentParser(description=module_doc.split("\n\n")[0], prog=f"python -m preprocess.{name}")
    g = parser.add_argument_group(group)
    g.add_argument("--input", required=True, nargs="+", help=input_help)
    return parser, g


def add_settings_flags(group: argparse._ArgumentGroup, settings: type) -> None:
    """One flag per field of a settings dataclass, ``--field-name`` (a bool: a switch), its default the field's and
    its help the field's ``help`` metadata: the defaults are written once, in the dataclass the workers take."""
    for f in dataclasses.fields(settings):
        flag, help_text = f"--{f.name.replace('_', '-')}", f.metadata.get("help")
        if isinstance(f.default, bool):
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            group.add_argument(flag, type=type(f.default), default=f.default, help=help_text)


def settings_from_args(settings: type[Settings], args: argparse.Namespace) -> Settings:
    """The settings dataclass of the flags ``add_settings_flags`` declared."""
    return settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings)})


def add_common_args(parser: argparse.ArgumentParser, default_shard_size: int = 10000) -> None:
    """The output, parallelism and resume flags every converter takes (read by ``ShardedRun``)."""
    g = parser.add_argument_group("output, parallelism and resume")
    g.add_argument("--output", required=True, help="output directory (re-running into it resumes)")
    g.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="worker processes (0 = run in the main process)",
    )
    g.add_argument(
        "--shard-size",
        type=int,
        default=default_shard_size,
        help="input records per output shard (shard k = records [k*size, (k+1)*size))",
    )
    g.add_argument("--num-shards", type=int, default=1, help="machines sharing this job")
    g.add_argument("--shard-index", type=int, default=0, help="this machine's index in [0, num-shards)")
    g.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.01,
        help="exit non-zero (after writing the manifest) if more of the inputs are skipped",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard this machine's earlier output in --output when it was made with other settings",
    )


def check_common_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag; converters call it before starting workers (then ``parser.error``)."""
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index} not in [0, --num-shards {args.num_shards})")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise ValueError(f"--max-skip-fraction must be in [0, 1], got {args.max_skip_fraction}")


@contextlib.contextmanager
def output_lock(args: argparse.Namespace) -> Iterator[Path]:
    """Hold this run's output lock (see the module docstring); yields the lock file's path.

    The lock file is never deleted: unlinking a lock file lets two processes hold locks on different
    inodes of the same name."""
    check_common_args(args)
    output_dir = Path(args.output)
    path = (output_dir / f"{LOCK_PREFIX}{manifest_name(args.num_shards, args.shard_index)}").absolute()
    if path in _held_locks:
        fd, depth = _held_locks[path]
        _held_locks[path] = (fd, depth + 1)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(
                f"{output_dir}: another converter ({holder}) is writing this output (lock {path}); "
                f"wait for it to finish or stop it, or use a different --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        _held_locks[path] = (fd, 1)
    try:
        yield path
    finally:
        fd, depth = _held_locks.pop(path)
        if depth > 1:
            _held_locks[path] = (fd, depth - 1)
        else:
            os.close(fd)  # releases the flock

"""Machinery shared by every offline converter: input splitting, resumable shards, manifests, skips.

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

API for a converter (see ``preprocess/pairs.py`` for a full example)::

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
multiprocessing pool, or in-process when workers == 0), ``atomic_write_bytes``/``atomic_write_json``,
``file_sha256``. Input readers (formats, decompression, the start-up probe) live in ``preprocess/readers.py``.

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
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

FORMAT_VERSION = 1
EXIT_TOO_MANY_SKIPS = 3
TMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"
_held_locks: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, nesting depth) held by this process


# ---- atomic files ---------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling then os.replace, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# ---- sharded, resumable runs ----------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_shard_size: int = 10000) -> None:
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


EXAMPLES_PER_REASON = 5


@dataclass
class ShardResult:
    """What a converter reports for one shard; count skips with ``skip`` so examples are kept."""

    samples: int
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "where: why"
    dropped: Counter = field(default_factory=Counter)  # parts of kept samples left out (captions), by reason

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(where)


@dataclass
class ShardTask:
    """One output shard to produce: its records and where to write its files."""

    index: int
    first_record: int | None  # None where shards are input units (tars), not record ranges
    records: list[tuple[int, Any]]
    output_dir: Path
    name: str
    progress: Callable[[int], None] = lambda n: None  # call with the samples written as they are

    def tmp_path(self, suffix: str) -> Path:
        return self.output_dir / f"{TMP_PREFIX}{self.name}{suffix}"

    def final_path(self, suffix: str) -> Path:
        return self.output_dir / f"{self.name}{suffix}"


@dataclass(frozen=True)
class ShardInput:
    """The input records of one output shard, read only when this machine converts it."""

    first_record: int | None
    load: Callable[[], list[Any]]


def fixed_size_shards(records: Iterable[Any], size: int) -> Iterator[ShardInput]:
    """Shard k = records [k * size, (k + 1) * size) of one stream (read in full by every machine, to count)."""
    it = iter(records)
    for k in itertools.count():
        block = list(itertools.islice(it, size))
        if not block:
            return
        yield ShardInput(k * size, lambda block=block: block)


def fixed_size_rows(total: int | None, size: int) -> list[int] | None:
    """The records of each fixed-size shard of `total` records (None when the total is not known)."""
    if total is None:
        return None
    return [min(size, total - start) for start in range(0, total, size)]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def manifest_name(num_shards: int, shard_index: int) -> str:
    return "manifest.json" if num_shards == 1 else f"manifest-node{shard_index:03d}-of-{num_shards:03d}.json"


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


class ShardedRun:
    """Drives one converter run: selects this machine's shards, resumes, writes the manifest."""

    def __init__(
        self,
        args: argparse.Namespace,
        kind: str,
        fingerprints: dict[str, str],
        file_suffixes: Sequence[str],
        resume_ignore: Sequence[str] = (),
    ):
        check_common_args(args)
        self.args = args
        self.kind = kind
        self.fingerprints = dict(fingerprints)
        self.suffixes = tuple(file_suffixes)
        self.output_dir = Path(args.output)
        self.manifest_path = self.output_dir / manifest_name(args.num_shards, args.shard_index)
        # settings that change how records become bytes must match on resume; these need not
        volatile = {"workers", "max_skip_fraction", "no_progress", "output", "overwrite", *resume_ignore}
        self.identity_args = {k: _jsonable(v) for k, v in sorted(vars(args).items()) if k not in volatile}

    def _manifest(self, shards: dict[int, dict], complete: bool) -> dict:
        ordered = [shards[k] for k in sorted(shards)]
        skipped, dropped = Counter(), Counter()
        examples: dict[str, list[str]] = {}
        for s in ordered:
            skipped.update(s["skipped"])
            dropped.update(s.get("dropped", {}))
            for reason, found in s.get("skip_examples", {}).items():
                kept = examples.setdefault(reason, [])
                kept.extend(found[: EXAMPLES_PER_REASON - len(kept)])
        inputs = sum(s["num_records"] for s in ordered)
        fraction = sum(skipped.values()) / inputs if inputs else 0.0
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "args": {k: _jsonable(v) for k, v in sorted(vars(self.args).items())},
            "fingerprints": self.fingerprints,
            "num_shards": self.args.num_shards,
            "shard_index": self.args.shard_index,
            "complete": complete,
            "inputs_seen": inputs,
            "samples_written": sum(s["samples"] for s in ordered),
            "skipped": dict(sorted(skipped.items())),
            "skip_examples": dict(sorted(examples.items())),
            "dropped": dict(sorted(dropped.items())),
            "shards": ordered,
            "skip_check": {
                "fraction": fraction,
                "max": self.args.max_skip_fraction,
                "passed": fraction <= self.args.max_skip_fraction,
            },
        }

    def _remove_stale_temporaries(self) -> None:
        """Leftovers of a killed run of THIS machine (others may be writing into the same directory)."""
        n, me = self.args.num_shards, self.args.shard_index
        for stale in self.output_dir.glob(f"{TMP_PREFIX}{self.manifest_path.name}.*"):
            stale.unlink()
        prefix = f"{TMP_PREFIX}{shard_name(0)[:-6]}"
        for stale in self.output_dir.glob(f"{prefix}*"):
            digits = stale.name[len(prefix) : len(prefix) + 6]
            if digits.isdigit() and int(digits) % n == me:
                stale.unlink()

    def _load_finished(self) -> dict[int, dict]:
        """Shards recorded by an earlier run into this output whose files are intact."""
        if not self.manifest_path.exists():
            return {}
        old = json.loads(self.manifest_path.read_text())
        old_identity = {k: v for k, v in old.get("args", {}).items() if k in self.identity_args}
        if (
            old.get("kind") != self.kind
            or old_identity != self.identity_args
            or old.get("fingerprints") != self.fingerprints
        ):
            changed = sorted(k for k in self.identity_args if old_identity.get(k) != self.identity_args[k])
            if not self.args.overwrite:
                raise SystemExit(
                    f"{self.manifest_path}: an earlier run with different settings wrote this output "
                    f"(changed: {changed or 'kind/fingerprints'}); pass --overwrite to replace it, or use a new "
                    "--output"
                )
            self._discard(old)
            return {}
        finished = {}
        for s in old.get("shards", []):
            # size, not sha256: a resume must not re-read terabytes; readers can verify checksums
            ok = all(
                (self.output_dir / f["name"]).is_file() and (self.output_dir / f["name"]).stat().st_size == f["size"]
                for f in s["files"]
            )
            if ok:
                finished[s["index"]] = s
        return finished

    def _discard(self, old: dict) -> None:
        """--overwrite: delete the files an earlier run of this machine recorded, then its manifest."""
        for shard in old.get("shards", []):
            for entry in shard.get("files", []):
                (self.output_dir / entry["name"]).unlink(missing_ok=True)
        for entry in old.get("merged", {}).get("files", []):
            (self.output_dir / entry["name"]).unlink(missing_ok=True)
        self.manifest_path.unlink()
        print(f"[{self.kind}] --overwrite: removed the earlier output of {self.manifest_path}", file=sys.stderr)

    def _commit(self, task: ShardTask, result: ShardResult) -> dict:
        files = []
        for suffix in self.suffixes:
            tmp, final = task.tmp_path(suffix), task.final_path(suffix)
            if not tmp.exists():
                raise RuntimeError(f"converter did not write {tmp}")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            files.append({"name": final.name, "size": final.stat().st_size, "sha256": file_sha256(final)})
        return {
            "index": task.index,
            "first_record": task.first_record,
            "num_records": len(task.records),
            "samples": result.samples,
            "skipped": dict(sorted(result.skipped.items())),
            "skip_examples": dict(sorted(result.examples.items())),
            "dropped": dict(sorted(result.dropped.items())),
            "files": files,
        }

    def _report_skips(self, result: ShardResult, shards: dict[int, dict]) -> None:
        """Print the first few skipped samples of each reason in this run, naming where they are."""
        shown = Counter()
        for s in shards.values():
            shown.update({reason: len(found) for reason, found in s.get("skip_examples", {}).items()})
        for reason, found in result.examples.items():
            for where in found[: max(0, EXAMPLES_PER_REASON - shown[reason])]:
                tqdm.write(f"[{self.kind}] skipped ({reason}) {where}", file=sys.stderr)

    def run(
        self,
        inputs: Iterable[ShardInput],
        convert: Callable[[ShardTask], ShardResult],
        shard_rows: Sequence[int] | None = None,
    ) -> int:
        """Convert this machine's shards of `inputs` (shard k = the k-th ShardInput); ``shard_rows``: the input
        records of every shard where known up front, for the progress bar's total and ETA."""
        with output_lock(self.args):
            return self._run(inputs, convert, shard_rows)

    def _run(
        self,
        inputs: Iterable[ShardInput],
        convert: Callable[[ShardTask], ShardResult],
        shard_rows: Sequence[int] | None,
    ) -> int:
        n, me = self.args.num_shards, self.args.shard_index
        self._remove_stale_temporaries()
        shards = self._load_finished()
        bar = tqdm(
            total=sum(r for k, r in enumerate(shard_rows) if k % n == me) if shard_rows is not None else None,
            unit=" records",
            disable=self.args.no_progress,
            desc=f"{self.kind} -> {self.output_dir}",
            dynamic_ncols=True,
        )
        start, written = time.time(), 0
        for k, shard in enumerate(inputs):
            if k % n != me:
                continue
            if k in shards:
                bar.update(shards[k]["num_records"])
                continue
            records = shard.load()
            first = shard.first_record or 0
            task = ShardTask(
                k,
                shard.first_record,
                list(enumerate(records, first)),
                self.output_dir,
                shard_name(k),
                progress=bar.update,
            )
            result = convert(task)
            bar.update(len(records) - result.samples)  # convert advanced the bar by the samples it wrote
            self._report_skips(result, shards)
            shards[k] = self._commit(task, result)
            atomic_write_json(self.manifest_path, self._manifest(shards, complete=False))
            written += result.samples
            bar.set_postfix(skipped=sum(sum(s["skipped"].values()) for s in shards.values()))
        bar.close()
        manifest = self._manifest(shards, complete=True)
        atomic_write_json(self.manifest_path, manifest)
        elapsed = time.time() - start
        print(
            f"[{self.kind}] {self.manifest_path}: {manifest['inputs_seen']} inputs, "
            f"{manifest['samples_written']} written "
            f"({written} this run, {written / max(elapsed, 1e-9):.1f} samples/s), "
            f"skipped {manifest['skipped']}",
            file=sys.stderr,
        )
        check = manifest["skip_check"]
        if not check["passed"]:
            print(
                f"[{self.kind}] ERROR: skipped fraction {check['fraction']:.4f} > --max-skip-fraction "
                f"{check['max']} (reasons: {manifest['skipped']}); see {self.manifest_path}",
                file=sys.stderr,
            )
            return EXIT_TOO_MANY_SKIPS
        return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


__all__ = [
    "EXIT_TOO_MANY_SKIPS",
    "ShardInput",
    "ShardResult",
    "ShardTask",
    "ShardedRun",
    "add_common_args",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_common_args",
    "file_sha256",
    "fixed_size_rows",
    "fixed_size_shards",
    "manifest_name",
    "output_lock",
    "shard_name",
    "worker_pool",
]

"""``ShardedRun``: one converter run over this machine's shards, resumable, ending in its manifest.

The contract (which shards a machine converts, what a resume keeps, the manifest's fields) is described in
``preprocess/common.py``; the manifest's names and file checks are ``flava_ds/shard_format.py``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flava_ds.shard_format import TMP_PREFIX, atomic_write_json, file_entry, manifest_name, publish
from preprocess.common import check_common_args, output_lock
from preprocess.shards import EXAMPLES_PER_REASON, ShardInput, ShardResult, ShardTask, shard_name

FORMAT_VERSION = 1
EXIT_TOO_MANY_SKIPS = 3


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
            publish(tmp, final)
            files.append(file_entry(final))
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
    """An argument value as the manifest records it (paths and other objects as strings)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)

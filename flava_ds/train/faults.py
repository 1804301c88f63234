"""Fault-injection and accounting hooks for the reliability tests (docs/RELIABILITY.md), read once from the environment.

* ``FLAVA_DS_INJECT_NAN_STEPS="3,4"``: the loss of these optimizer steps (1-based) is made NaN on every rank.
* ``FLAVA_DS_INJECT_SAVE_DELAY_S="30"``: ``checkpoint.save`` sleeps this long after the engine wrote the
  checkpoint and before ``latest`` names it, so a test can kill a run inside that window.
* ``FLAVA_DS_INJECT_ERROR="1:5"``: rank 1 raises an exception at the start of optimizer step 5 (a fatal error on
  one rank while the others go on into their next collective).
* ``FLAVA_DS_SAMPLE_LOG=DIR``: every rank appends the ``SampleKey``s of each micro-batch it trained on to
  ``DIR/rank{R}.jsonl`` (one JSON line per micro-batch: step, micro, task, keys).

Unset (the normal case) every hook is an attribute test that is false: nothing is done or allocated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    save_delay_s: float = 0.0
    sample_log: Path | None = None
    error_at: tuple[int, int] | None = None  # (rank, step)

    @classmethod
    def from_env(cls) -> Faults:
        steps = os.environ.get("FLAVA_DS_INJECT_NAN_STEPS", "")
        log = os.environ.get("FLAVA_DS_SAMPLE_LOG")
        error = os.environ.get("FLAVA_DS_INJECT_ERROR")
        return cls(
            nan_steps=frozenset(int(s) for s in steps.split(",") if s.strip()),
            save_delay_s=float(os.environ.get("FLAVA_DS_INJECT_SAVE_DELAY_S", "0")),
            sample_log=Path(log) if log else None,
            error_at=tuple(int(v) for v in error.split(":")) if error else None,
        )


FAULTS = Faults.from_env()


def log_samples(rank: int, step: int, micro: int, kind: str, keys: list) -> None:
    """Append one micro-batch's keys to this rank's sample log with a single write (whole lines survive a kill)."""
    FAULTS.sample_log.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"step": step, "micro": micro, "kind": kind, "keys": [list(k) for k in keys]}) + "\n"
    fd = os.open(FAULTS.sample_log / f"rank{rank}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

"""The run's metrics file: JSON lines a strict parser reads, holding one trajectory however often the run resumed.

* Non-finite numbers (a NaN loss on a skipped step) are written as `null`: bare `NaN` is not JSON.
* A run resumed from step S first drops the records after S: the killed run's steps past its last checkpoint
  are retrained, and keeping both would list those steps twice with different values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON `null`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop every record after `step` (and a torn last line of a killed run), atomically."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

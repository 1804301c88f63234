"""One fp32 ZeRO-0 rank skips DeepSpeed's gradient all-reduce (a full flatten-and-copy per step) and still makes
exactly the updates the reduction makes, unused parameters included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_single_rank_without_allreduce_updates_exactly_as_with_it(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [str(ROOT / "tests" / "single_rank_worker.py"), str(tmp_path)]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "result.pt")
    for accum in (1, 2):
        run = out[accum]
        assert run["skipped"]
        for name, reduced in run["reduced"].items():
            torch.testing.assert_close(run["direct"][name], reduced, rtol=0, atol=0, msg=f"accum {accum}: {name}")

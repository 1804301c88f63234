"""One fp32 ZeRO-0 rank skips DeepSpeed's gradient all-reduce (a full flatten-and-copy per step) and still makes
exactly the updates the reduction makes, unused parameters included."""

from __future__ import annotations

import torch

from tests.launch import ROOT, run_worker


def test_single_rank_without_allreduce_updates_exactly_as_with_it(tmp_path):
    run_worker(ROOT / "tests" / "single_rank_worker.py", 1, str(tmp_path))
    out = torch.load(tmp_path / "result.pt")
    for accum in (1, 2):
        run = out[accum]
        assert run["skipped"]
        for name, reduced in run["reduced"].items():
            torch.testing.assert_close(run["direct"][name], reduced, rtol=0, atol=0, msg=f"accum {accum}: {name}")

"""The data order's first batch: time and memory at PMD (7e7) and LAION (2e9) scale, vs a materialised permutation.

    python tools/bench_sampler.py [--sizes 70000000 2000000000] [--micro 256] [--dp 8] [--rounds 5]

For each size N: build one stream's `ResumableDistributedSampler` mid-epoch and draw rank 5's first micro-batch
(what every rank pays per stream at start-up and at every epoch boundary), best of `--rounds`, and the peak
memory it allocated (tracemalloc). The baseline, measured in the same run, is the materialised
``default_rng(seed).permutation(N)`` the sampler used before (only for N up to ``--baseline-max``: at 2e9 it
needs 16 GB).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from flava_ds.data.sampler import ResumableDistributedSampler


def measure(run: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(best seconds, peak MiB allocated) of `run`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[70_000_000, 2_000_000_000])
    parser.add_argument("--micro", type=int, default=256, help="micro batch per rank")
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-max", type=int, default=100_000_000, help="largest N to permute in full")
    args = parser.parse_args(argv)
    print(f"# bench_sampler: {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"{'N':>14} {'ours ms':>9} {'ours MiB':>9} {'perm ms':>9} {'perm MiB':>9} {'speedup':>8}")
    for n in args.sizes:
        consumed = (n // 2) // (args.micro * args.dp) * args.micro * args.dp  # mid-epoch

        def first_batch(n: int = n, consumed: int = consumed) -> list:
            sampler = ResumableDistributedSampler(n, args.micro, dp_rank=5, dp_size=args.dp, consumed_samples=consumed)
            return next(iter(sampler))

        ours_s, ours_mib = measure(first_batch, args.rounds)
        if n <= args.baseline_max:
            perm_s, perm_mib = measure(lambda n=n: np.random.default_rng([0, 0]).permutation(n), min(args.rounds, 2))
            row = f"{perm_s * 1e3:9.1f} {perm_mib:9.1f} {perm_s / ours_s:7.0f}x"
        else:
            row = f"{'-':>9} {n * 8 / 2**20:8.0f}* {'-':>8}"
        print(f"{n:>14,} {ours_s * 1e3:9.3f} {ours_mib:9.3f} {row}")
    print("* not run: the permutation alone would need this much memory (int64 per sample)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

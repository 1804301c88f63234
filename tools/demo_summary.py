#!/usr/bin/env python
"""Summarise a run from its metrics file: each loss at start and end, the held-out evaluation against
chance, and where the logs and checkpoints are.

  python tools/demo_summary.py --metrics runs/demo/metrics.jsonl --out-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> tuple[list[dict], list[dict]]:
    logs, evals = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "log" in record:
            logs.append(record)
        elif "eval" in record:
            evals.append(record)
    if not logs:
        raise SystemExit(f"{path}: no logged steps; did training run?")
    return logs, evals


def loss_table(logs: list[dict]) -> list[tuple[str, float, float]]:
    """(term, first logged value, last logged value) for every per-kind loss term."""
    rows = []
    names = sorted({k for r in logs for k in r["log"] if k.startswith("loss/") and k.count("/") == 2})
    for name in names:
        values = [r["log"][name] for r in logs if name in r["log"]]
        rows.append((name.removeprefix("loss/"), values[0], values[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    logs, evals = load(Path(args.metrics))
    out = Path(args.out_dir)

    print(f"\n{'loss (per batch kind)':<34}{'start':>10}{'end':>10}")
    for name, start, end in loss_table(logs):
        print(f"{name:<34}{start:>10.3f}{end:>10.3f}")
    if evals:
        first, last = evals[0]["eval"], evals[-1]["eval"]
        print(f"\nheld-out evaluation at step {evals[-1]['step']}{'':<8}{'result':>10}{'reference':>12}")
        rows = [
            ("zero-shot digit accuracy", "zero_shot/top1", "zero_shot/chance", "chance"),
            ("image->text retrieval R@1", "retrieval/image_to_text_R@1", "retrieval/chance_R@1", "chance"),
            ("text->image retrieval R@1", "retrieval/text_to_image_R@1", "retrieval/chance_R@1", "chance"),
            ("ITM accuracy", "itm_accuracy", None, "chance 0.5"),
            ("MLM accuracy", "mlm_accuracy", "mlm_baseline", "most frequent token"),
            ("MIM accuracy", "mim_accuracy", "mim_baseline", "most frequent token"),
        ]
        for label, key, ref_key, ref_name in rows:
            if key in last:
                ref = f"{last[ref_key]:.3f} {ref_name}" if ref_key in last else ref_name
                print(f"{label:<34}{last[key]:>10.3f}   {ref}")
        if "zero_shot/top1" in last:
            ratio = last["zero_shot/top1"] / last["zero_shot/chance"]
            print(
                f"\nzero-shot accuracy is {ratio:.1f}x chance "
                f"(first evaluation: {first.get('zero_shot/top1', float('nan')):.3f})"
            )
    throughput = logs[-1]["log"].get("throughput/samples_per_s")
    if throughput is not None:
        print(f"throughput at the end: {throughput:.1f} samples/s")
    print(f"\nmetrics:      {args.metrics}")
    print(f"checkpoints:  {out / 'checkpoints'} (fp32 export: {out / 'export'}, transformers: {out / 'export_hf'})")
    print(f"TensorBoard:  tensorboard --logdir {out / 'tensorboard'}")


if __name__ == "__main__":
    main()

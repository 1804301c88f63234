"""A shorter `./run.sh` demo: the whole pipeline on the bundled digits and Python docs must show learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_short_demo_learns(tmp_path):
    env = {
        **os.environ,
        "DEMO_DIR": str(tmp_path / "demo"),
        "DEMO_LIMIT": "600",
        "DEMO_STEPS": "200",
        "DEMO_OVERRIDES": '--data.kind_ratios={"image_text":1} --train.eval_interval=100 --eval.max_samples=256',
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "demo.sh")], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "zero-shot digit accuracy" in result.stdout  # the summary table was printed

    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    logs = [r["log"] for r in records if "log" in r]
    for term in ("loss/image_text/total", "loss/image_text/global_contrastive", "loss/image_text/mmm_text"):
        assert logs[-1][term] < logs[0][term] - 0.3, (term, logs[0][term], logs[-1][term])
    final = [r["eval"] for r in records if "eval" in r][-1]
    assert final["zero_shot/top1"] > 1.5 * final["zero_shot/chance"]
    chance_r10 = 10 * final["retrieval/chance_R@1"]
    assert final["retrieval/image_to_text_R@10"] > 1.5 * chance_r10
    assert final["retrieval/text_to_image_R@10"] > 1.5 * chance_r10
    assert (tmp_path / "demo" / "export_hf" / "model.safetensors").is_file()

    # the demo ends with tools/evaluate.py on its export: the in-training evaluation's numbers, and more
    tool = json.loads((tmp_path / "demo" / "eval.json").read_text())["metrics"]
    for name in ("zero_shot/top1", *(k for k in final if k.startswith("retrieval/")), "itm_accuracy"):
        assert tool[name] == pytest.approx(final[name], abs=1e-6), name
    printed = result.stdout[result.stdout.rindex("metric") :]
    for name in ("zero_shot/top5", "retrieval/image_to_text_R@1", "mim_accuracy", "mlm_accuracy", "linear_probe/top1"):
        assert name in printed and name in tool, name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "demo" / "tensorboard"))
    events.Reload()
    assert "eval/linear_probe/top1" in events.Tags()["scalars"]  # the tool's scalars beside training's

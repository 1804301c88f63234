"""A tiny but complete training setup made by the real preprocess tools: tokenizer, shards, run YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tests.data_fixtures import CODEBOOK, caption, make_tokenizer, random_image, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def make_training_data(root: Path, num_pairs: int = 48, num_docs: int = 40) -> dict[str, Path]:
    """Image-text, image-only (2 classes) and text shards + a held-out split, in `root`."""
    from preprocess import images, pairs, text

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(root)
    rng = np.random.default_rng(0)
    (root / "img").mkdir(exist_ok=True)
    records = []
    for i in range(num_pairs):
        name = f"img/{i:04d}.jpg"
        random_image(rng, 100, 90).save(root / name)
        records.append({"image": name, "caption": caption(rng, int(rng.integers(4, 10)))})
    write_jsonl(root / "train.jsonl", records[: num_pairs * 3 // 4])
    write_jsonl(root / "heldout.jsonl", records[num_pairs * 3 // 4 :])
    common = [
        "--tokenizer",
        str(tokenizer),
        "--codebook",
        CODEBOOK,
        "--image-size",
        "80",
        "--workers",
        "0",
        "--no-progress",
    ]
    for split in ("train", "heldout"):
        assert (
            pairs.main(
                [
                    "--input",
                    str(root / f"{split}.jsonl"),
                    "--image-root",
                    str(root),
                    "--output",
                    str(root / f"pairs_{split}"),
                    "--shard-size",
                    "16",
                    *common,
                ]
            )
            == 0
        )
    for label in ("red", "blue"):
        (root / "classes" / label).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            random_image(rng, 90, 90).save(root / "classes" / label / f"{i}.jpg")
    image_args = [a for a in common if a not in ("--tokenizer", str(tokenizer))]
    assert (
        images.main(
            ["--input", str(root / "classes"), "--output", str(root / "images"), "--shard-size", "8", *image_args]
        )
        == 0
    )
    docs = [{"text": " ".join(caption(rng, int(rng.integers(5, 30))) for _ in range(2))} for _ in range(num_docs)]
    write_jsonl(root / "docs.jsonl", docs)
    assert (
        text.main(
            [
                "--input",
                str(root / "docs.jsonl"),
                "--tokenizer",
                str(tokenizer),
                "--output",
                str(root / "text"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    return {
        "tokenizer": tokenizer,
        "pairs": root / "pairs_train",
        "heldout": root / "pairs_heldout",
        "images": root / "images",
        "text": root / "text",
    }


def write_run_config(path: Path, shards: dict[str, Path], **sections) -> Path:
    config = {
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(shards["tokenizer"]),
            "image_text": {"paths": [str(shards["pairs"])]},
            "image": {"paths": [str(shards["images"])]},
            "text": {"paths": [str(shards["text"])]},
            "task_ratios": {"image_text": 2.0, "image": 1.0, "text": 1.0},
            "num_workers": 0,
            "text_max_length": 32,
        },
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"steps": 5, "log_interval": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def write_ds_config(path: Path, stage: int, micro: int = 2, accum: int = 1, precision: str = "fp32") -> Path:
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    config.pop("bf16", None)
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    path.write_text(json.dumps(config))
    return path


def launcher_command(nproc: int, *args: str, port: int | None = None, env: dict | None = None):
    """(argv, environment) of `deepspeed --num_gpus N flava_ds/pretrain.py ...` on CPU ranks (gloo)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(port or _free_port()), str(ROOT / "flava_ds" / "pretrain.py"), *args]  # fmt: skip
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def launch(nproc: int, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run pretrain.py under the DeepSpeed launcher to completion."""
    cmd, full_env = launcher_command(nproc, *args, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(metrics_file: Path) -> dict[int, float]:
    out = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


KNOWN_EXIT_ABORT = "terminate called without an active exception"  # DeepSpeed on CPU, after training finished


def finished(result: subprocess.CompletedProcess, ranks: int, stopped_early: bool = False) -> bool:
    """Every rank printed the completion marker (or, `stopped_early`, the stop marker), and the exit code is 0 or
    only the known abort at exit."""
    from flava_ds.train.trainer import COMPLETE_MARKER, STOPPED_MARKER

    output = result.stdout + result.stderr
    done = output.count(STOPPED_MARKER if stopped_early else COMPLETE_MARKER) == ranks
    return done and (result.returncode == 0 or KNOWN_EXIT_ABORT in output)

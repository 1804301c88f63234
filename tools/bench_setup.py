"""What the training benchmarks set up: shards made by the real preprocess tools, the trainer's own loader over
them, a 1-rank process group, and both models.

`make_shards` writes image-text, image-only and text shards (random images, a small WordPiece vocabulary, the tiny
random dVAE codebook; a model's cost does not depend on the values); `make_streams` opens them as
`flava_ds.train.streams.TrainStreams`, one resumable stream per batch kind, as a training run does; `build_engine`
is the trainer's engine (`flava_ds.train.engine`), `build_transformers` the reference model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tools.make_demo_data import write_jsonl

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "a man woman child dog cat sits stands runs on in near the red blue green old new small large street "
    "beach field table car bike boat house tree sky water park city window with under over two three"
).split()


# ---- data ---------------------------------------------------------------------------------------------
def make_shards(
    root: Path, stored_size: int, pairs: int, docs: int, workers: int = 1, seed: int = 0
) -> dict[str, Path]:
    """Image-text, image-only and text shards made by the real preprocess tools (tiny random dVAE).

    Captions are 4-40 words (ragged, so dynamic padding is exercised); images are stored at `stored_size`."""
    from preprocess import images as prep_images
    from preprocess import pairs as prep_pairs
    from preprocess import text as prep_text

    rng = np.random.default_rng(seed)
    for folder in ("img", "classes/a", "classes/b"):  # image-only corpus: ImageNet-style class folders
        (root / folder).mkdir(parents=True)
    records = []
    for i in range(pairs):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((stored_size + 40, stored_size + 20), Image.BICUBIC)
        image.save(root / "img" / f"{i:05d}.jpg", quality=90)
        if i % 2 == 0:
            image.save(root / "classes" / "ab"[i % 4 // 2] / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(4, 41))))
        records.append({"image": f"img/{i:05d}.jpg", "caption": caption})
    write_jsonl(root / "pairs.jsonl", records)
    documents = [{"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 400))))} for _ in range(docs)]
    write_jsonl(root / "docs.jsonl", documents)
    train_tokenizer(root / "pairs.jsonl", root / "tokenizer.json")
    tokenizer = str(root / "tokenizer.json")
    common = [
        "--codebook",
        "random:0:tiny",
        "--image-size",
        str(stored_size),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    checks = [
        prep_pairs.main(
            [
                "--input",
                str(root / "pairs.jsonl"),
                "--image-root",
                str(root),
                "--output",
                str(root / "pairs"),
                "--tokenizer",
                tokenizer,
                *common,
            ]
        ),
        prep_images.main(["--input", str(root / "classes"), "--output", str(root / "images"), *common]),
        prep_text.main(
            [
                "--input",
                str(root / "docs.jsonl"),
                "--tokenizer",
                tokenizer,
                "--output",
                str(root / "text"),
                "--workers",
                "1",
                "--no-progress",
            ]
        ),
    ]
    if any(checks):
        raise SystemExit(f"preprocessing failed (exit codes {checks})")
    return {
        "tokenizer": root / "tokenizer.json",
        "image_text": root / "pairs",
        "image": root / "images",
        "text": root / "text",
    }


def existing_shards(directory: Path) -> dict[str, Path]:
    """A --data directory laid out like `make_shards` writes it."""
    shards = {
        "tokenizer": directory / "tokenizer.json",
        "image_text": directory / "pairs",
        "image": directory / "images",
        "text": directory / "text",
    }
    missing = [str(p) for p in shards.values() if not p.exists()]
    if missing:
        raise SystemExit(f"--data {directory}: missing {missing}")
    return shards


def make_streams(
    shards: dict[str, Path], ratios: dict[str, float], crop: int, micro: int, workers: int, text_max_length: int
):
    """The trainer's own loader: one resumable stream per kind, the task mixer, the data-wait clock."""
    from flava_ds.data.tokenizer import Tokenizer
    from flava_ds.train.config import DataSection, StreamConfig
    from flava_ds.train.streams import TrainStreams

    section = DataSection(
        tokenizer=str(shards["tokenizer"]),
        image_text=StreamConfig(paths=[str(shards["image_text"])]),
        image=StreamConfig(paths=[str(shards["image"])]),
        text=StreamConfig(paths=[str(shards["text"])]),
        kind_ratios=ratios,
        text_max_length=text_max_length,
        num_workers=workers,
    )
    return TrainStreams(section, Tokenizer.from_file(section.tokenizer), crop, micro)


def init_process_group(device: torch.device) -> None:
    """A 1-rank group (gloo on CPU, NCCL on GPU): the DeepSpeed engine and the contrastive gather run as in training."""
    import deepspeed

    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def ds_config(stage: int, precision: str, micro: int, clip: float) -> dict[str, Any]:
    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    config.pop("bf16", None)
    config.pop("fp16", None)
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, gradient_clipping=clip)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config


def build_engine(model: torch.nn.Module, config: dict[str, Any], lr: float):
    """Our model under DeepSpeed as the trainer builds it (`flava_ds.train.engine.build_engine`)."""
    from flava_ds.train.config import OptimizerSection
    from flava_ds.train.engine import build_engine as trainer_engine

    return trainer_engine(model, config, OptimizerSection(lr=lr))


def build_transformers(directory: Path, device: torch.device, lr: float):
    """transformers' FlavaForPreTraining from our exported initial weights (fp32 weights, plain AdamW)."""
    import transformers

    model = transformers.FlavaForPreTraining.from_pretrained(directory).to(device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def train_tokenizer(pairs_file: Path, output: Path) -> Path:
    """A 400-token WordPiece vocabulary on the captions: enough for the converter and the collators."""
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_tokenizer.py"),
            "--input",
            str(pairs_file),
            "--json-key",
            "caption",
            "--vocab-size",
            "400",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
    )
    return output

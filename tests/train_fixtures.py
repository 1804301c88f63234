"""A tiny but complete training setup made by the real preprocess tools: tokenizer, shards, run YAML."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.data_fixtures import CODEBOOK, caption, make_tokenizer, pairs_args, random_image
from tests.launch import ROOT
from tests.text_fixtures import run_text_preprocess, write_jsonl


def make_training_data(root: Path, num_pairs: int = 48, num_docs: int = 40) -> dict[str, Path]:
    """Image-text, image-only (2 classes) and text shards + a held-out split, in `root`."""
    from preprocess import images, pairs

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
    for split in ("train", "heldout"):
        args = pairs_args(root, root / f"pairs_{split}", inputs=(f"{split}.jsonl",), shard_size=16)
        assert pairs.main(args) == 0
    for label in ("red", "blue"):
        (root / "classes" / label).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            random_image(rng, 90, 90).save(root / "classes" / label / f"{i}.jpg")
    image_args = ["--input", str(root / "classes"), "--output", str(root / "images"), "--shard-size", "8"]
    image_args += ["--codebook", CODEBOOK, "--image-size", "80", "--workers", "0", "--no-progress"]
    assert images.main(image_args) == 0
    docs = [{"text": " ".join(caption(rng, int(rng.integers(5, 30))) for _ in range(2))} for _ in range(num_docs)]
    write_jsonl(root / "docs.jsonl", docs)
    assert run_text_preprocess([root / "docs.jsonl"], root / "text", tokenizer, "--workers", "1") == 0
    return {
        "tokenizer": tokenizer,
        "pairs": root / "pairs_train",
        "heldout": root / "pairs_heldout",
        "images": root / "images",
        "text": root / "text",
    }


def write_run_config(path: Path, shards: dict[str, Path], **sections) -> Path:
    """A run YAML for the tiny preset on `shards`; each keyword updates that section."""
    config = {
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(shards["tokenizer"]),
            "image_text": {"paths": [str(shards["pairs"])]},
            "image": {"paths": [str(shards["images"])]},
            "text": {"paths": [str(shards["text"])]},
            "kind_ratios": {"image_text": 2.0, "image": 1.0, "text": 1.0},
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
    """ds_configs/zero<stage>.json with this micro batch, accumulation and precision (fp32 or bf16)."""
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    config.pop("bf16", None)
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    path.write_text(json.dumps(config))
    return path


def step_losses(metrics_file: Path) -> dict[int, float]:
    """Step -> loss of a metrics file."""
    out = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def pretrain_refusal(argv: list[str]) -> str:
    """The message pretrain.main(argv) exits with in-process; fails if it built a model first."""
    from flava_ds import pretrain
    from flava_ds.model import FlavaForPreTraining

    built = []
    original = FlavaForPreTraining.__init__
    FlavaForPreTraining.__init__ = lambda self, *a, **k: built.append(1) or original(self, *a, **k)
    try:
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main(argv)
    finally:
        FlavaForPreTraining.__init__ = original
    assert not built, "the model was built before the config was refused"
    return str(exit_info.value.code)


KNOWN_EXIT_ABORT = "terminate called without an active exception"  # DeepSpeed on CPU, after training finished


def finished(result: subprocess.CompletedProcess, ranks: int, stopped_early: bool = False) -> bool:
    """Every rank printed the completion marker (or, `stopped_early`, the stop marker), and the exit code is 0 or
    only the known abort at exit."""
    from flava_ds.train.trainer import COMPLETE_MARKER, STOPPED_MARKER

    output = result.stdout + result.stderr
    done = output.count(STOPPED_MARKER if stopped_early else COMPLETE_MARKER) == ranks
    return done and (result.returncode == 0 or KNOWN_EXIT_ABORT in output)

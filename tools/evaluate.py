#!/usr/bin/env python
"""Evaluate a FLAVA model the way the field does, on its own: a DeepSpeed training checkpoint, a flava_ds export
or a `transformers` directory (so released FLAVA weights are scored by the same code as ours).

  python tools/evaluate.py --model runs/demo/export --tokenizer runs/demo/tokenizer.json \\
      --zero-shot shards/images_heldout [--class-names names.tsv] [--templates ensemble|simple|FILE] \\
      --retrieval shards/pairs_heldout --text shards/text_heldout \\
      --probe-train shards/images_train --probe-val shards/images_heldout \\
      [--json metrics.json] [--tensorboard-dir runs/eval --step 1000]

- zero-shot classification (`--zero-shot` labelled image shards with classes.json or `--class-names`): top-1/5
  against per-class text embeddings averaged over the prompt templates;
- retrieval (`--retrieval` image-text shards): image<->text R@1/5/10, the COCO/Flickr multi-caption protocol (an
  image hits when any of its captions is retrieved; every caption is a query), plus ITM accuracy and MIM accuracy;
  or on raw data: `--captions` a COCO caption file or a Karpathy split file (dataset_coco.json,
  dataset_flickr30k.json; `--split test`) with `--image-root`, images processed as the export records;
- `--text` held-out text shards: MLM accuracy; `--probe-train/--probe-val`: the linear probe on frozen image
  features (logistic regression).
The tokenizer is `--tokenizer`, else the one the model directory records (processing.json), else its tokenizer
file. The numbers equal the in-training evaluation (`eval.*` of the run config) at the same step: both call
`flava_ds.train.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flava_ds.train.config import RunConfig

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# What to evaluate and with what, each a path or a name: (flag, help).
INPUTS: tuple[tuple[str, str], ...] = (
    ("--tag", "with a DeepSpeed checkpoint dir: the tag (default: its 'latest')"),
    ("--tokenizer", "tokenizer.json / vocab.txt / sentencepiece .model (default: in --model)"),
    ("--zero-shot", "labelled image shards for zero-shot classification"),
    ("--class-names", "class names in label order: JSON list/object or lines label<TAB>name"),
    ("--templates", "prompt templates: simple (default), ensemble, or a file"),
    ("--retrieval", "held-out image-text shards: retrieval R@1/5/10, ITM, MIM"),
    ("--captions", "COCO caption JSON or Karpathy split JSON: retrieval on raw images"),
    ("--image-root", "with --captions: the directory the image file names are under"),
    ("--split", "with a Karpathy split file: the split to score (e.g. test)"),
    ("--text", "held-out text shards: MLM accuracy"),
    ("--probe-train", "labelled image shards to fit the linear probe on"),
    ("--probe-val", "labelled image shards to score the linear probe on"),
)
# Settings the in-training evaluation takes from the run config, so their defaults come from --run-config (else
# a default run's): (flag, type, run-config key, help).
RUN_SETTINGS: tuple[tuple[str, type, str, str], ...] = (
    ("--max-samples", int, "eval.max_samples", "per evaluation"),
    ("--batch-size", int, "eval.batch_size", "per forward pass"),
    ("--text-max-length", int, "data.text_max_length", "held-out text windows for MLM"),
    ("--mlm-prob", float, "data.mlm_prob", "MLM masking probability"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from flava_ds.train.config import ConfigError, RunConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="DeepSpeed checkpoint dir, flava_ds export or transformers dir")
    for flag, text in INPUTS:
        parser.add_argument(flag, help=text)
    keys = [key for _, _, key, _ in RUN_SETTINGS]
    parser.add_argument(
        "--run-config",
        help=f"a run YAML: its eval.prompts, {', '.join(keys)} become the defaults (the in-training evaluation's "
        "settings)",
    )
    default_run = RunConfig()
    for flag, kind, key, text in RUN_SETTINGS:
        parser.add_argument(flag, type=kind, help=f"{text} ({key}; default {_setting(default_run, key)})")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--json", help="write the metrics and the settings to this JSON file")
    parser.add_argument("--tensorboard-dir", help="also write the metrics as eval/* scalars at --step")
    parser.add_argument("--step", type=int, default=0, help="the training step the scalars are logged at")
    args = parser.parse_args(argv)
    if bool(args.probe_train) != bool(args.probe_val):
        parser.error("the linear probe needs both --probe-train and --probe-val")
    if bool(args.captions) != bool(args.image_root):
        parser.error("raw-image retrieval needs both --captions and --image-root")
    if not (args.zero_shot or args.retrieval or args.captions or args.text or args.probe_train):
        parser.error("nothing to evaluate: give --zero-shot, --retrieval, --text and/or --probe-train/--probe-val")
    try:
        run_config = RunConfig.load(args.run_config, []) if args.run_config else default_run
    except ConfigError as err:
        parser.error(f"--run-config: {err}")
    for flag, _, key, _ in RUN_SETTINGS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) is None:
            setattr(args, name, _setting(run_config, key))
    from flava_ds.train.evaluate import load_templates

    try:  # the prompt templates as a list: the named set or file, else the run's eval.prompts (default: simple)
        args.templates = load_templates(args.templates) if args.templates else run_config.eval.prompts
    except ValueError as err:
        parser.error(str(err))
    return args


def _setting(run_config: RunConfig, key: str) -> Any:
    """The run config's value at a dotted `key` (`eval.max_samples`)."""
    section, name = key.split(".")
    return getattr(getattr(run_config, section), name)


def load_model(path: Path, tag: str | None, scratch: Path):
    """(model, the directory holding its files): a DeepSpeed checkpoint is exported to `scratch` first."""
    from flava_ds.model import FlavaForPreTraining
    from flava_ds.train.checkpoint import export, read_latest

    if (path / "latest").is_file() or tag:
        tag = tag or read_latest(path)
        export(path, scratch, tag)
        return FlavaForPreTraining.from_pretrained(scratch), path / tag
    return FlavaForPreTraining.from_pretrained(path), path


def read_caption_file(path: str, split: str | None) -> tuple[list[str], list[list[str]]]:
    """(image file names, their captions) of a COCO caption file or a Karpathy split file."""
    from preprocess.input_records import BadRecord
    from preprocess.line_readers import read_coco

    data = json.loads(Path(path).read_text())
    images = data.get("images") if isinstance(data, dict) else None
    if images and "sentences" in images[0]:  # Karpathy: {"images": [{filepath, filename, sentences, split}]}
        chosen = [im for im in images if split is None or im.get("split") == split]
        files = [str(Path(im.get("filepath", ""), im["filename"])) for im in chosen]
        return files, [[sentence["raw"] for sentence in im["sentences"]] for im in chosen]
    records = [r for _, r in read_coco(path) if not isinstance(r, BadRecord) and r["captions"]]
    return [r["file_name"] for r in records], [r["captions"] for r in records]


def run(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from tqdm import tqdm

    from flava_ds.data.image_dataset import eval_pixels
    from flava_ds.data.processing import load_processing
    from flava_ds.data.tokenizer import Tokenizer
    from flava_ds.train import evaluate as ev

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        model, home = load_model(Path(args.model), args.tag, Path(scratch))
    model = model.to(device).eval()
    crop, count, batch = model.config.image.image_size, args.max_samples, args.batch_size
    processing = load_processing(home)  # what training recorded: tokenizer and raw-image processing
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = processing.tokenizer if processing and processing.tokenizer else Tokenizer.from_file(home)
    pixels = processing.pixel_values if processing else partial(eval_pixels, resize=crop, crop=crop)
    jobs = []  # (name, the call), every call one of flava_ds.train.evaluate's, as in training
    common = (crop, count, batch, device)
    if args.zero_shot:
        names = ev.load_class_names(args.class_names) if args.class_names else None
        templates = args.templates
        zero_shot = partial(ev.zero_shot_classification, model, args.zero_shot, tokenizer, templates, *common, names)
        jobs.append(("zero-shot", zero_shot))
    if args.retrieval:
        jobs.append(("retrieval + ITM", partial(ev.retrieval_metrics, model, args.retrieval, tokenizer, *common)))
        if model.config.mim_weight > 0:
            jobs.append(("MIM", partial(ev.mim_metrics, model, args.retrieval, *common)))
    if args.captions:
        files, captions = read_caption_file(args.captions, args.split)
        images = [Path(args.image_root, name) for name in files[:count]]
        raw = partial(ev.caption_file_retrieval, model, images, captions[:count], tokenizer, pixels, batch, device)
        jobs.append(("retrieval on raw images", raw))
    if args.text:
        masking = (args.text_max_length, args.mlm_prob)
        jobs.append(("MLM", partial(ev.mlm_metrics, model, args.text, tokenizer, *masking, *common[1:])))
    if args.probe_train:
        probe = partial(ev.linear_probe_metrics, model, args.probe_train, args.probe_val, *common)
        jobs.append(("linear probe", probe))
    metrics: dict[str, float] = {}
    with tqdm(jobs, desc="evaluate", unit="task") as progress:
        for name, job in progress:
            progress.set_postfix_str(name)
            metrics.update(job())
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        metrics = run(args)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"evaluate: {err}")
    width = max(map(len, metrics))
    print(f"\n{'metric':<{width}}  value\n{'-' * width}  -------")
    for name, value in sorted(metrics.items()):
        print(f"{name:<{width}}  {value:.4f}")
    print(f"({time.perf_counter() - start:.1f} s, model {args.model})")
    if args.json:
        record = {"model": args.model, "step": args.step, "metrics": metrics, "settings": vars(args)}
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard_dir) as writer:
            for name, value in metrics.items():
                writer.add_scalar(f"eval/{name}", value, args.step)


if __name__ == "__main__":
    main()

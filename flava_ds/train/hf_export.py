"""What a transformers FLAVA directory needs beside config.json and the weights to be used on its own.

From the processing record and training.json a flava_ds export carries (`flava_ds.data.processing`,
`flava_ds.train.sidecars`): `tokenizer.json` + `tokenizer_config.json` (AutoTokenizer; the ids of flava_ds's
`Tokenizer.encode`), `preprocessor_config.json` (FlavaImageProcessor; the pixels of flava_ds's `eval_pixels`), which
together load as `FlavaProcessor`, and a README.md model card: the model, the inputs, the training data and,
given the run's metrics file, its last evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flava_ds.data.processing import load_processing, read_record
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model.config import FlavaConfig
from flava_ds.train.sidecars import read_training

log = logging.getLogger("flava_ds.hf_export")
RESAMPLE = {"bicubic": 3}  # PIL.Image.Resampling, the code preprocessor_config.json stores


def complete_hf_directory(
    export: str | Path, output: str | Path, config: FlavaConfig, metrics: str | Path | None = None
) -> None:
    """Add the tokenizer, image processor and model card of `export`'s model to the transformers dir `output` (its
    weights and config.json already written); `metrics`: the run's metrics file, for the card's evaluation."""
    export, output = Path(export), Path(output)
    training = read_training(export)
    evaluation = last_eval(Path(metrics), training["step"] if training else None) if metrics else None
    processing = load_processing(export)
    if processing is None:
        log.warning(
            "%s has no processing.json (written before checkpoints recorded their tokenizer, or not a flava_ds "
            "export): %s gets no tokenizer and no image processor, so FlavaProcessor.from_pretrained cannot load it; "
            "save the training tokenizer and a FlavaImageProcessor there with transformers",
            export,
            output,
        )
    else:
        if processing.tokenizer is None:
            log.warning("%s: an image-only run, no tokenizer recorded: %s gets an image processor only", export, output)
        else:
            save_hf_tokenizer(processing.tokenizer, output, config.text.max_position_embeddings)
        save_hf_image_processor(processing.image, output)
    card = model_card(config, read_record(export), training, evaluation)
    (output / "README.md").write_text(card)


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json: `[CLS] text [SEP]`, `truncation=True` cuts to `max_length`."""
    from transformers import PreTrainedTokenizerFast

    specials = {f"{role}_token": token for role, token in tokenizer.special_tokens().items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_tokenizers(), model_max_length=max_length, **specials)
    fast.save_pretrained(directory)


def save_hf_image_processor(image: dict[str, Any], directory: Path) -> None:
    """preprocessor_config.json: resize, centre crop and normalisation of the record, no augmentation."""
    from transformers import FlavaImageProcessorPil

    crop = image["crop_size"]
    FlavaImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": image["resize_shortest_edge"]},
        resample=RESAMPLE[image["resample"]],
        do_center_crop=True,
        crop_size={"height": crop, "width": crop},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=image["mean"],
        image_std=image["std"],
    ).save_pretrained(directory)


def last_eval(metrics: Path, step: int | None) -> dict[str, Any] | None:
    """The last evaluation ({"step", "eval"}) in a run's metrics file up to `step` (the exported checkpoint's; None:
    any), None if there is none."""
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such metrics file; pass the run's logging.metrics_file to --metrics")
    found = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record and (step is None or record["step"] <= step):
            found = record
    return found


USAGE = """```python
from transformers import FlavaModel, FlavaProcessor

path = "path/to/this/directory"
processor, model = FlavaProcessor.from_pretrained(path), FlavaModel.from_pretrained(path)
inputs = processor(text=["a photo of a dog"], images=[image], return_tensors="pt", padding=True)
```

The contrastive embeddings (flava_ds's `encode_image` / `encode_text`) are the L2-normalised first (CLS) position
of `model.get_image_features(pixel_values=...).pooler_output` and `model.get_text_features(input_ids=...,
attention_mask=...).pooler_output`.
"""


def model_card(config: FlavaConfig, processing: dict | None, training: dict | None, evaluation: dict | None) -> str:
    """README.md: how to load it, the model, its inputs, the training data and the last evaluation."""
    steps = f" for {training['step']} steps" if training else ""
    lines = ["---", "library_name: transformers", "tags:", "- flava", "---", ""]
    lines += [f"# FLAVA pretrained with flava_ds{steps}", "", USAGE, *_model(config), "", "## Inputs", ""]
    lines += _inputs(processing) if processing else ["Not recorded: no tokenizer or image processor here."]
    if training:
        lines += ["", *_data(training["data"])]
    if evaluation:
        lines += ["", f"## Evaluation (step {evaluation['step']})", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(evaluation["eval"].items())]
    return "\n".join(lines) + "\n"


def _model(config: FlavaConfig) -> list[str]:
    image, text = config.image, config.text
    lines = ["## Model", "", "| encoder | hidden | layers | heads | MLP | |", "| --- | --- | --- | --- | --- | --- |"]
    for name, enc, extra in (
        ("image", image, f"{image.image_size} px, patch {image.patch_size}, codebook {image.codebook_vocab_size}"),
        ("text", text, f"vocabulary {text.vocab_size}, {text.max_position_embeddings} positions"),
        ("multimodal", config.multimodal, ""),
    ):
        lines.append(f"| {name} | {enc.hidden_size} | {enc.num_layers} | {enc.num_heads} | {enc.mlp_size} | {extra} |")
    lines += ["", f"Projection dimension {config.projection_dim}. The full flava_ds `FlavaConfig`:", "", "```json"]
    return [*lines, json.dumps(config.to_dict(), indent=2), "```"]


def _inputs(processing: dict) -> list[str]:
    tok, image = processing["tokenizer"], processing["image"]
    lines = []
    if tok:
        case = ", lower-cased" if tok["kind"] == "vocab.txt" and tok["lowercase"] else ""
        lines.append(f"Text: the {tok['kind']} tokenizer `{tok['fingerprint']}`{case}; `[CLS] tokens [SEP]`.")
    mean, std = (", ".join(f"{v:.4f}" for v in image[key]) for key in ("mean", "std"))
    lines.append(
        f"Images: short side resized to {image['resize_shortest_edge']} px ({image['resample']}), centre crop "
        f"{image['crop_size']} px, normalised with mean ({mean}) and std ({std})."
    )
    return lines


def _data(sources: dict[str, Any]) -> list[str]:
    lines = ["## Training data", "", "| stream | ratio | shards | samples | fingerprints |", "| --- " * 5 + "|"]
    for stream, source in sources.items():
        for shard in source["shards"]:
            prints = ", ".join(f"{k} `{v}`" for k, v in sorted(shard["fingerprints"].items()))
            lines.append(f"| {stream} | {source['ratio']} | `{shard['path']}` | {shard['samples']} | {prints} |")
    return lines

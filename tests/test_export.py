"""Self-contained exports: a training checkpoint -> `from-deepspeed` -> `to-hf` gives a transformers directory that
FlavaProcessor + FlavaModel load alone and that reproduces flava_ds's text and image embeddings on raw strings and
PIL images (WordPiece and sentencepiece tokenizers); its tokenizer encodes exactly like flava_ds's Tokenizer and its
image processor gives the pixels of flava_ds's eval transform."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flava_ds.data.image_dataset import eval_pixels
from flava_ds.data.processing import PROCESSING, load_processing
from flava_ds.data.tokenizer import Tokenizer, TokenizerError
from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.hf_export import save_hf_image_processor, save_hf_tokenizer
from flava_ds.train.sidecars import TRAINING
from tests.data_fixtures import random_image
from tests.launch import launch_pretrain
from tests.text_fixtures import train_tokenizers, write_corpus
from tests.train_fixtures import finished, write_ds_config, write_run_config
from tools import convert_checkpoint

TEXTS = [
    "a dog runs on the grass",
    "A RED Car near the OLD house!",
    "boat  on the   river at night",
    "unbelievable happiness, tokenization: running",
    "café naïve ｆｕｌｌ width",
    " ".join(["the big tree"] * 40),  # longer than MAX_LENGTH: truncated, [SEP] kept
    "",
]
MAX_LENGTH = 24
MIN_COSINE = 0.9999


def raw_images() -> list[Image.Image]:
    """Photos of assorted shapes and modes: landscape, portrait, square, tiny, grayscale, RGBA and palette."""
    rng = np.random.default_rng(3)
    images = [random_image(rng, w, h) for w, h in ((120, 90), (70, 131), (64, 64), (37, 50), (300, 101))]
    images.append(random_image(rng, 90, 80).convert("L"))
    rgba = random_image(rng, 80, 100).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (100, 80), dtype=np.uint8)))
    images.append(rgba)
    png = io.BytesIO()
    random_image(rng, 99, 66).convert("P").save(png, "PNG", transparency=0)
    images.append(Image.open(png))
    return images


def hf_ids(tokenizer, text: str, max_length: int | None) -> list[int]:
    return tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]


def export_to_hf(save_dir: Path, tmp: Path, *extra: str) -> tuple[Path, Path]:
    """The user's two commands: the checkpoint -> a flava_ds export -> a transformers directory."""
    export, hf = tmp / "export", tmp / "hf"
    convert_checkpoint.main(["from-deepspeed", "--input", str(save_dir), "--output", str(export)])
    convert_checkpoint.main(["to-hf", "--input", str(export), "--output", str(hf), *extra])
    return export, hf


@torch.no_grad()
def check_transformers_reproduces_flava_ds(export: Path, hf: Path) -> tuple[float, float]:
    """transformers alone (FlavaProcessor + FlavaModel on `hf`) against flava_ds (the export's model, tokenizer and
    eval transform): the same ids and pixels, and embeddings with cosine >= MIN_COSINE; returns the smallest
    (image, text) cosines."""
    from transformers import AutoTokenizer, FlavaModel, FlavaProcessor

    processing = load_processing(export)
    ours = FlavaForPreTraining.from_pretrained(export).eval()
    images = raw_images()
    pixels = torch.stack([processing.pixel_values(image) for image in images])
    ids = [torch.tensor(processing.tokenizer.encode(text, MAX_LENGTH)) for text in TEXTS]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=processing.tokenizer.pad_id)
    attention_mask = (input_ids != processing.tokenizer.pad_id).long()
    image_emb, text_emb = ours.encode_image(pixels), ours.encode_text(input_ids, attention_mask)

    processor = FlavaProcessor.from_pretrained(hf)
    model = FlavaModel.from_pretrained(hf).eval()
    image_inputs = processor(images=images, return_tensors="pt")
    text_inputs = processor(text=TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    torch.testing.assert_close(image_inputs["pixel_values"], pixels, rtol=0, atol=1e-5)
    assert text_inputs["input_ids"].tolist() == input_ids.tolist()
    assert text_inputs["attention_mask"].tolist() == attention_mask.tolist()
    auto = AutoTokenizer.from_pretrained(hf)
    assert [hf_ids(auto, text, MAX_LENGTH) for text in TEXTS] == [i.tolist() for i in ids]

    # get_*_features project every position of the post-LN states: flava_ds's embedding is the CLS one, normalised
    hf_image = model.get_image_features(pixel_values=image_inputs["pixel_values"]).pooler_output[:, 0]
    hf_text = model.get_text_features(
        input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"]
    ).pooler_output[:, 0]
    image_cos = (F.normalize(hf_image, dim=-1) * image_emb).sum(-1)
    text_cos = (F.normalize(hf_text, dim=-1) * text_emb).sum(-1)
    assert image_cos.min() >= MIN_COSINE and text_cos.min() >= MIN_COSINE, (image_cos, text_cos)
    return float(image_cos.min()), float(text_cos.min())


def test_wordpiece_training_run_exports_a_self_contained_transformers_dir(training_data, tmp_path):
    """A real short run (mixed batch kinds, evaluation) with the fixtures' WordPiece tokenizer.json."""
    metrics = tmp_path / "metrics.jsonl"
    config = write_run_config(
        tmp_path / "run.yaml",
        training_data,
        train={"steps": 3, "log_interval": 1},
        eval={"image_text": [str(training_data["heldout"])], "max_samples": 8, "batch_size": 8},
        logging={"metrics_file": str(metrics)},
    )
    ds = write_ds_config(tmp_path / "ds.json", 0)
    result = launch_pretrain(1, "--deepspeed_config", str(ds), "--config", str(config), "--save", str(tmp_path / "ck"))
    assert finished(result, 1), result.stdout[-3000:] + result.stderr[-3000:]
    tag = tmp_path / "ck" / "global_step3"
    assert {PROCESSING, TRAINING, "tokenizer.json"} <= {p.name for p in tag.iterdir()}

    export, hf = export_to_hf(tmp_path / "ck", tmp_path, "--metrics", str(metrics))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "README.md"} <= {
        p.name for p in hf.iterdir()
    }
    cosines = check_transformers_reproduces_flava_ds(export, hf)
    print(f"wordpiece: min cosine image {cosines[0]:.7f}, text {cosines[1]:.7f}")

    card = (hf / "README.md").read_text()
    fingerprint = Tokenizer.from_file(training_data["tokenizer"]).fingerprint
    assert "for 3 steps" in card and f"`{fingerprint}`" in card
    assert str(training_data["pairs"]) in card and "retrieval/image_to_text_R@1" in card


def test_sentencepiece_training_run_exports_a_self_contained_transformers_dir(tmp_path):
    """A short text-only run with a case-folding sentencepiece model: its transformers tokenizer is a converted
    fast tokenizer that gives the same ids."""
    from preprocess import text
    from tools.train_tokenizer import train_sentencepiece

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 200)
    write_corpus(tmp_path / "captions.jsonl", 40, seed=1)
    model = train_sentencepiece([corpus], 120, tmp_path / "sp" / "sp.model")
    shards = tmp_path / "text"
    args = ["--input", str(tmp_path / "captions.jsonl"), "--tokenizer", str(model), "--output", str(shards)]
    assert text.main([*args, "--workers", "1", "--no-progress"]) == 0
    data = {"tokenizer": model, "pairs": shards, "images": shards, "text": shards}
    config = write_run_config(
        tmp_path / "run.yaml",
        data,
        data={"image_text": {"paths": []}, "image": {"paths": []}, "kind_ratios": {"text": 1.0}},
        train={"steps": 2, "log_interval": 1},
    )
    ds = write_ds_config(tmp_path / "ds.json", 0)
    result = launch_pretrain(1, "--deepspeed_config", str(ds), "--config", str(config), "--save", str(tmp_path / "ck"))
    assert finished(result, 1), result.stdout[-3000:] + result.stderr[-3000:]

    export, hf = export_to_hf(tmp_path / "ck", tmp_path)
    assert (export / "tokenizer.model").is_file() and not list(hf.glob("*.model"))
    cosines = check_transformers_reproduces_flava_ds(export, hf)
    print(f"sentencepiece: min cosine image {cosines[0]:.7f}, text {cosines[1]:.7f}")


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    from tools.train_tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("tokenizers")
    files = train_tokenizers(directory)
    files["sentencepiece-bpe"] = train_sentencepiece(
        [directory / "corpus.jsonl"], 80, directory / "spbpe" / "sp.model", model_type="bpe"
    )
    return files


@pytest.mark.parametrize(
    ("kind", "lowercase"),
    [
        ("tokenizer.json", True),
        ("vocab.txt", True),
        ("vocab.txt", False),
        ("bpe", True),
        ("sentencepiece", True),
        ("sentencepiece-bpe", True),
    ],
)
def test_transformers_tokenizer_encodes_like_flava_ds(tokenizer_files, tmp_path, kind, lowercase):
    """Every tokenizer kind: AutoTokenizer on the written files gives Tokenizer.encode's ids, truncated or not;
    tokenizers that match special tokens in the text ("a [MASK] b") do so identically too."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(tokenizer_files[kind], lowercase=lowercase)
    save_hf_tokenizer(ours, tmp_path, max_length=64)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    texts = [*TEXTS, "Unbelievable HAPPINESS Walked", "ship\tyard\nlight  house", "x" * 300]
    if not kind.startswith("sentencepiece"):  # sentencepiece never reads its special pieces out of the text
        texts += ["a [MASK] dog [SEP] [CLS]x[PAD]", "[UNK][mask]"]
    for text in texts:
        for max_length in (None, 2, 5, 64):
            assert hf_ids(theirs, text, max_length) == ours.encode(text, max_length), (text, max_length)
    assert theirs.pad_token_id == ours.pad_id == 0 and theirs.mask_token_id == ours.mask_id


def test_eval_transform_matches_the_exported_image_processor(tmp_path):
    """flava_ds's eval transform and the written FlavaImageProcessor give the same pixel_values (resize below and
    above the crop, any image mode)."""
    from transformers import FlavaImageProcessorPil

    from flava_ds.data.processing import processing_record

    for resize, crop in ((64, 64), (80, 64), (48, 32)):
        image = {**processing_record(None, crop)["image"], "resize_shortest_edge": resize}
        save_hf_image_processor(image, tmp_path)
        processor = FlavaImageProcessorPil.from_pretrained(tmp_path)
        for raw in raw_images():
            ours = eval_pixels(raw, resize, crop)
            theirs = processor(images=raw, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5, msg=f"{raw.size} {raw.mode} {resize}/{crop}")
    with pytest.raises(ValueError, match="crop 64 must be at most the resized short side 48"):
        eval_pixels(raw_images()[0], 48, 64)


def test_to_hf_without_a_processing_record_still_converts_and_warns(tmp_path, caplog):
    """An export from before checkpoints recorded their tokenizer: the weights convert as before, with a warning
    that the directory has no tokenizer."""
    from transformers import FlavaModel

    FlavaForPreTraining(FlavaConfig.preset("tiny")).save_pretrained(tmp_path / "export")
    with caplog.at_level(logging.WARNING):
        convert_checkpoint.main(["to-hf", "--input", str(tmp_path / "export"), "--output", str(tmp_path / "hf")])
    assert "no tokenizer and no image processor" in caplog.text
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    FlavaModel.from_pretrained(tmp_path / "hf")


def test_a_replaced_tokenizer_copy_is_refused(tokenizer_files, tmp_path):
    """The export's tokenizer must be the file training used: another one is refused, naming the file."""
    from flava_ds.data.processing import processing_record, tokenizer_copy

    tokenizer = Tokenizer.from_file(tokenizer_files["tokenizer.json"])
    (tmp_path / PROCESSING).write_text(json.dumps(processing_record(tokenizer, 64)))
    for name, source in tokenizer_copy(tokenizer).items():
        shutil.copyfile(source, tmp_path / name)
    assert load_processing(tmp_path).tokenizer.fingerprint == tokenizer.fingerprint
    shutil.copyfile(tokenizer_files["bpe"], tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: fingerprint .* the tokenizer file was replaced"):
        load_processing(tmp_path)

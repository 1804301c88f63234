"""Evaluation functions, shared by the in-training evaluation and tools/evaluate.py, against hand computations
(the whole tool on a trained export runs in tests/test_demo.py, against the in-training numbers)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.evaluate import TEMPLATE_SETS, class_embeddings, load_class_names, load_templates, retrieval_recall
from flava_ds.train.linear_probe import fit_logistic_regression, linear_probe
from tests.data_fixtures import make_tokenizer
from tests.launch import ROOT


def test_coco_retrieval_counts_a_hit_when_any_caption_of_the_image_is_in_the_top_k():
    # 3 images, captions owned 0,0,1,1,2; image 0's best caption (column 1) is beaten by one other caption
    owner = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.1, 0.8, 0.9, 0.0, 0.0],
            [0.0, 0.0, 0.2, 0.9, 0.1],
            [0.0, 0.0, 0.0, 0.0, 0.5],
        ]
    )
    metrics = retrieval_recall(sim, owner, ks=(1, 2))
    assert metrics["retrieval/image_to_text_R@1"] == pytest.approx(2 / 3)
    assert metrics["retrieval/image_to_text_R@2"] == 1.0
    # caption queries: 0 -> images ranked [0 .1, 1 0, 2 0] hit; 1 hit; 2 -> image 0 (0.9) beats 1 (0.2): miss;
    # 3 hit; 4 hit
    assert metrics["retrieval/text_to_image_R@1"] == pytest.approx(4 / 5)
    assert metrics["retrieval/text_to_image_R@2"] == 1.0


def test_template_ensembling_is_the_normalised_mean_of_normalised_prompt_embeddings(tmp_path):
    from flava_ds.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(make_tokenizer(tmp_path))
    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny")).eval()
    templates = ["a photo of a {}.", "the {} in a picture", "{}"]
    names = ["red circle", "blue_square"]
    got = class_embeddings(model, tokenizer, names, templates, torch.device("cpu"))
    for row, name in enumerate(names):
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        by_hand = []
        for prompt in prompts:  # one prompt at a time: no padding involved
            ids = torch.tensor([tokenizer.encode(prompt)])
            by_hand.append(F.normalize(model.encode_text(ids, torch.ones_like(ids))[0], dim=-1))
        mean = torch.stack(by_hand).mean(0)
        torch.testing.assert_close(got[row], mean / mean.norm(), rtol=1e-5, atol=1e-6)
        # the ensemble is not its first prompt (an untrained tiny model: the prompts differ by ~1e-3, the match is
        # to ~1e-7)
        assert (got[row] - by_hand[0]).abs().max() > 1e-4


def test_templates_and_class_names_load_from_files(tmp_path):
    assert load_templates("simple") == TEMPLATE_SETS["simple"] and len(load_templates("ensemble")) == 7
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\nart of the {}.\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "art of the {}."]
    (tmp_path / "bad.txt").write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(ValueError, match="line"):
        load_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "names.tsv").write_text("1\tgoldfish\n0\ttench\n")
    assert load_class_names(str(tmp_path / "names.tsv")) == ["tench", "goldfish"]
    (tmp_path / "names.json").write_text('{"goldfish": 1, "tench": 0}')
    assert load_class_names(str(tmp_path / "names.json")) == ["tench", "goldfish"]


def test_logistic_regression_reaches_its_optimum_and_the_probe_separates_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    labels = torch.arange(120) % 3
    features = centres[labels] + torch.randn(120, 8, generator=g)
    weight, bias = fit_logistic_regression(features, labels, 3, penalty=1e-2)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = F.cross_entropy(features.double() @ w.t() + b, labels) + 1e-2 / 2 * w.square().sum()
    loss.backward()  # the minimum of a strictly convex objective: zero gradient
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    metrics = linear_probe((features[:90], labels[:90]), (features[90:], labels[90:]), 3)
    assert metrics["linear_probe/top1"] > 0.9 and metrics["linear_probe/majority"] < 0.5


def test_the_tool_refuses_an_empty_or_half_probe_request():
    tool = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", "nowhere"]
    for extra, message in (([], "nothing to evaluate"), (["--probe-train", "x"], "needs both")):
        result = subprocess.run([*tool, *extra], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_image_retrieval_from_coco_and_karpathy_files_ranks_by_hand(tmp_path):
    """tools/evaluate.py --captions on a COCO caption file and on the same data as a Karpathy split file (with a
    train image that --split test leaves out) gives the recall of a ranking computed by hand from the model's
    embeddings of eval_pixels(image) and of each caption."""
    import json

    import numpy as np

    from flava_ds.data.image_dataset import eval_pixels
    from flava_ds.data.tokenizer import Tokenizer
    from tests.data_fixtures import caption, random_image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    names = [f"{i}.jpg" for i in range(4)]
    for name in names:
        random_image(rng, 96, 80).save(tmp_path / "img" / name)
    captions = [[caption(rng, 5) for _ in range(1 + i % 2)] for i in range(4)]  # 1 or 2 captions per image
    coco = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": c} for i, cs in enumerate(captions) for c in cs],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    karpathy = {
        "images": [
            {"filepath": "", "filename": n, "split": "test", "sentences": [{"raw": c} for c in cs]}
            for n, cs in zip(names, captions)
        ]
        + [{"filepath": "", "filename": names[0], "split": "train", "sentences": [{"raw": "left out"}]}]
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny")).eval()
    model.save_pretrained(tmp_path / "export")
    tokenizer_file = make_tokenizer(tmp_path)
    tool = _tool()
    common = [
        "--model",
        str(tmp_path / "export"),
        "--tokenizer",
        str(tokenizer_file),
        "--image-root",
        str(tmp_path / "img"),
    ]
    results = []
    for extra in (["--captions", str(tmp_path / "coco.json")], ["--captions", str(tmp_path / "karpathy.json")]):
        tool.main([*common, *extra, "--split", "test", "--json", str(tmp_path / "out.json"), "--batch-size", "3"])
        results.append(json.loads((tmp_path / "out.json").read_text())["metrics"])
    assert results[0] == results[1]

    tokenizer, size = Tokenizer.from_file(tokenizer_file), model.config.image.image_size
    from PIL import Image

    with torch.no_grad():
        images = torch.cat(
            [model.encode_image(eval_pixels(Image.open(tmp_path / "img" / n), size, size)[None]) for n in names]
        )
        texts, owner = [], []
        for i, cs in enumerate(captions):
            for c in cs:
                ids = torch.tensor([tokenizer.encode(c)])
                texts.append(model.encode_text(ids, torch.ones_like(ids))[0])
                owner.append(i)
    sim = (images @ torch.stack(texts).t()).tolist()  # (4 images, 6 captions)
    for k in (1, 5):  # a hit: fewer than k candidates score strictly higher than the best right one
        i2t = [
            sum(v > max(sim[i][t] for t in range(len(owner)) if owner[t] == i) for v in sim[i]) < k for i in range(4)
        ]
        t2i = [sum(sim[j][t] > sim[owner[t]][t] for j in range(4)) < k for t in range(len(owner))]
        assert results[0][f"retrieval/image_to_text_R@{k}"] == pytest.approx(np.mean(i2t))
        assert results[0][f"retrieval/text_to_image_R@{k}"] == pytest.approx(np.mean(t2i))

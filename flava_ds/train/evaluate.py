"""Held-out evaluation: zero-shot image<->text retrieval R@1/5/10 (the multi-caption COCO/Flickr protocol),
zero-shot classification with prompt-template ensembles (top-1/top-5), ITM accuracy, MLM / MIM accuracy and the
linear probe. The in-training evaluation (`evaluate`, every rank runs it: ZeRO-3 and tensor parallelism need all
ranks in each forward; rank 0 logs) and `tools/evaluate.py` (a checkpoint or export on its own) call the same
functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flava_ds.batch import Batch
from flava_ds.data.image_dataset import ImageAugment, ImageDataset
from flava_ds.data.image_text import ImageTextDataset
from flava_ds.data.sampler import SampleKey
from flava_ds.data.text_dataset import TextDataset
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model import FlavaForPreTraining
from flava_ds.parallel.layers import gather_vocab_logits
from flava_ds.shard_format import IGNORE_INDEX
from flava_ds.train.config import RunConfig

EVAL_SEED = 2024  # fixed crops, masks and ITM negatives: the same held-out batches at every evaluation
# Prompt templates for zero-shot classification; "ensemble" is the 7-template subset CLIP selected for ImageNet
TEMPLATE_SETS = {
    "simple": ["a photo of a {}."],
    "ensemble": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ],
}


def load_templates(spec: str) -> list[str]:
    """A built-in set by name (TEMPLATE_SETS) or a file with one template per line, each with `{}`."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec}: neither a built-in set ({sorted(TEMPLATE_SETS)}) nor a file")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [(n, t) for n, t in enumerate(templates, start=1) if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs '{{}}' where the class name goes; line {bad[:1] or 'none'}")
    return templates


def load_class_names(spec: str) -> list[str]:
    """Class names in label order: a JSON list or {name: label} object, or lines `label<TAB>name`."""
    text = Path(spec).read_text()
    if spec.endswith(".json"):
        raw = json.loads(text)
        return list(raw) if isinstance(raw, list) else sorted(raw, key=raw.get)
    rows = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
    return [name.strip() for _, name in sorted(rows, key=lambda row: int(row[0]))]


def _batches(dataset, count: int, batch_size: int) -> Iterator[Batch]:
    """The first `count` samples of `dataset` (epoch 0), collated by the dataset's own collator."""
    collate = dataset.collator()
    for start in range(0, count, batch_size):
        yield collate([dataset[SampleKey(i)] for i in range(start, min(count, start + batch_size))])


def retrieval_recall(
    similarity: torch.Tensor, owner: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """COCO/Flickr retrieval recall from similarity (N images, T captions), ``owner[t]`` = the image of caption t.

    Image -> text: an image hits at k when ANY of its captions is among the k nearest captions, i.e. when its
    best caption is beaten by fewer than k captions. Text -> image: every caption is a query for its image."""
    images = torch.arange(similarity.shape[0], device=similarity.device)
    own = owner[None, :] == images[:, None]  # (N, T)
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1).values
    image_ranks = (similarity > best_own[:, None]).sum(dim=1)
    true = similarity[owner, torch.arange(similarity.shape[1], device=similarity.device)]
    text_ranks = (similarity > true[None, :]).sum(dim=0)
    metrics = {f"retrieval/image_to_text_R@{k}": float((image_ranks < k).float().mean()) for k in ks}
    metrics.update({f"retrieval/text_to_image_R@{k}": float((text_ranks < k).float().mean()) for k in ks})
    return metrics


def _padded(captions: list[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [torch.from_numpy(c) for c in captions]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id).to(device)
    lengths = torch.tensor([len(c) for c in captions], device=device)
    attention_mask = (torch.arange(input_ids.shape[1], device=device)[None] < lengths[:, None]).long()
    return input_ids, attention_mask


@torch.no_grad()
def image_text_metrics(
    model: FlavaForPreTraining, dataset: ImageTextDataset, count: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Retrieval of the first `count` images against ALL their captions (the COCO protocol), and ITM accuracy
    on balanced pairs: every image with its own (drawn) caption and with the first caption of the next image."""
    image_emb, correct, seen = [], 0, 0
    for start in range(0, count, batch_size):
        indices = range(start, min(count, start + batch_size))
        batch = dataset.collator()([dataset[SampleKey(i)] for i in indices]).to(device)
        image_emb.append(model.encode_image(batch["pixel_values"]))
        if model.config.itm_weight > 0:
            others = [dataset.captions((i + 1) % count)[0] for i in indices]
            pairs = {
                1: (batch["input_ids"], batch["attention_mask"]),
                0: _padded(others, dataset.tokenizer.pad_id, device),
            }
            for label, (input_ids, attention_mask) in pairs.items():
                labels = torch.full((len(indices),), label, device=device)
                out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"])
                correct += int((out.logits["itm"].argmax(-1) == labels).sum())
                seen += len(indices)
    captions = [(i, ids) for i in range(count) for ids in dataset.captions(i)]
    text_emb = _text_embeddings(model, [ids for _, ids in captions], dataset.tokenizer.pad_id, batch_size, device)
    metrics = _retrieval(torch.cat(image_emb), text_emb, [i for i, _ in captions])
    if seen:
        metrics["itm_accuracy"] = correct / seen
    return metrics


def _text_embeddings(model, token_lists: list, pad_id: int, batch_size: int, device) -> torch.Tensor:
    chunks = [token_lists[s : s + batch_size] for s in range(0, len(token_lists), batch_size)]
    return torch.cat([model.encode_text(*_padded(chunk, pad_id, device)) for chunk in chunks])


def _retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: list[int]) -> dict[str, float]:
    """`retrieval_recall` of (N, D) image and (T, D) caption embeddings, caption t belonging to image owner[t]."""
    sim = image_emb.float() @ text_emb.float().t()
    metrics = retrieval_recall(sim, torch.tensor(owner, device=sim.device))
    metrics["retrieval/chance_R@1"] = 1.0 / len(image_emb)
    return metrics


@torch.no_grad()
def caption_file_retrieval(
    model: FlavaForPreTraining,
    images: list[Path],
    captions: list[list[str]],
    tokenizer: Tokenizer,
    pixels,
    batch_size: int,
    device,
) -> dict[str, float]:
    """Retrieval R@1/5/10 on raw data: image files with their `captions` (one list each), as a COCO/Flickr caption
    file gives them; `pixels` turns a PIL image into (3, S, S) pixel_values (the export's processing)."""
    from PIL import Image

    image_emb = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([pixels(Image.open(path)) for path in images[start : start + batch_size]])
        image_emb.append(model.encode_image(batch.to(device)))
    limit = model.config.text.max_position_embeddings
    owned = [(i, np.asarray(tokenizer.encode(c, max_length=limit))) for i, cs in enumerate(captions) for c in cs]
    text_emb = _text_embeddings(model, [ids for _, ids in owned], tokenizer.pad_id, batch_size, device)
    return _retrieval(torch.cat(image_emb), text_emb, [i for i, _ in owned])


@torch.no_grad()
def masked_accuracy(model: FlavaForPreTraining, batches, device: torch.device, head: str) -> tuple[float, float]:
    """(accuracy, baseline): the baseline always predicts the most frequent target of these batches."""
    correct = total = 0
    counts: dict[int, int] = {}
    for batch in batches:
        batch = batch.to(device)
        out = model(batch)
        labels = (
            batch.mim_labels.masked_select(batch.bool_masked_pos)
            if head == "mim"
            else batch.mlm_labels[batch.mlm_labels != IGNORE_INDEX]
        )
        logits = out.logits[head]
        if head == "mlm":  # under tensor parallelism each rank holds a slice of the vocabulary
            logits = gather_vocab_logits(logits, model.config.text.vocab_size)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        for value, count in zip(*torch.unique(labels, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(count)
    return correct / max(total, 1), max(counts.values(), default=0) / max(total, 1)


@torch.no_grad()
def class_embeddings(
    model: FlavaForPreTraining, tokenizer: Tokenizer, names: list[str], templates: list[str], device: torch.device
) -> torch.Tensor:
    """(classes, D): per class, the mean of its L2-normalised template embeddings, normalised again (CLIP's
    prompt ensembling)."""
    class_emb = []
    for name in names:
        texts = [t.format(name.replace("_", " ")) for t in templates]
        ids = [torch.tensor(tokenizer.encode(t, max_length=model.config.text.max_position_embeddings)) for t in texts]
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_id).to(device)
        emb = model.encode_text(input_ids, (input_ids != tokenizer.pad_id).long())  # (templates, D), normalised
        class_emb.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(class_emb)


def labelled_images(directory: str, crop: int, count: int) -> tuple[ImageDataset, torch.Tensor]:
    """The first `count` images of a labelled image shard set (eval crops) and their labels."""
    dataset = ImageDataset(directory, ImageAugment(crop_size=crop, flip=False), seed=EVAL_SEED)
    count = min(count, len(dataset))
    return dataset, torch.tensor([int(dataset.shards.row(i, ("label",))["label"]) for i in range(count)])


def class_names_of(directory: str) -> list[str]:
    """Class names in label order from a shard set's `classes.json` ({name: label})."""
    classes = json.loads((Path(directory) / "classes.json").read_text())
    return sorted(classes, key=classes.get)


@torch.no_grad()
def zero_shot_classification(
    model: FlavaForPreTraining,
    directory: str,
    tokenizer: Tokenizer,
    templates: list[str],
    crop: int,
    count: int,
    batch_size: int,
    device: torch.device,
    names: list[str] | None = None,
) -> dict[str, float]:
    """Classify each image by the nearest class embedding (`class_embeddings`); top-1 and top-5 accuracy.
    `names` (label order) replaces the shard set's classes.json, e.g. readable names for WordNet ids."""
    names = names or class_names_of(directory)
    class_emb = class_embeddings(model, tokenizer, names, templates, device)
    dataset, labels = labelled_images(directory, crop, count)
    if int(labels.max()) >= len(names):
        raise ValueError(f"{directory}: label {int(labels.max())} but only {len(names)} class names")
    scores = torch.cat(
        [
            model.encode_image(batch["pixel_values"].to(device)).float() @ class_emb.float().t()
            for batch in _batches(dataset, len(labels), batch_size)
        ]
    ).cpu()  # (N, classes)
    top = scores.topk(min(5, len(names)), dim=-1).indices
    hits = top == labels[:, None]
    return {
        "zero_shot/top1": float(hits[:, 0].float().mean()),
        "zero_shot/top5": float(hits.any(-1).float().mean()),
        "zero_shot/chance": 1.0 / len(names),
        "zero_shot/majority": float(np.bincount(labels.numpy()).max() / len(labels)),
    }


def linear_probe_metrics(
    model: FlavaForPreTraining, train: str, val: str, crop: int, count: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """The linear probe (`flava_ds.train.linear_probe`) on two labelled image shard sets."""
    from flava_ds.train.linear_probe import image_features, linear_probe

    sets = [labelled_images(directory, crop, count) for directory in (train, val)]
    features = [image_features(model, _batches(d, len(y), batch_size), device) for d, y in sets]
    classes = max(len(class_names_of(train)), int(max(y.max() for _, y in sets)) + 1)
    return linear_probe((features[0], sets[0][1]), (features[1], sets[1][1]), classes)


def retrieval_metrics(
    model: FlavaForPreTraining, path: str, tokenizer: Tokenizer, crop: int, count: int, batch_size: int, device
) -> dict[str, float]:
    """Retrieval and ITM (`image_text_metrics`) on held-out image-text shards, with eval crops."""
    augment = ImageAugment(crop_size=crop, flip=False)
    dataset = ImageTextDataset(path, tokenizer, augment, seed=EVAL_SEED, itm_negative_prob=0.0)
    return image_text_metrics(model, dataset, min(count, len(dataset)), batch_size, device)


def mim_metrics(model: FlavaForPreTraining, path: str, crop: int, count: int, batch_size: int, device):
    """MIM accuracy (and the most-frequent-token baseline) on held-out image or image-text shards."""
    images = ImageDataset(path, ImageAugment(crop_size=crop, flip=False), seed=EVAL_SEED)
    batches = _batches(images, min(count, len(images)), batch_size)
    accuracy, baseline = masked_accuracy(model, batches, device, "mim")
    return {"mim_accuracy": accuracy, "mim_baseline": baseline}


def mlm_metrics(
    model: FlavaForPreTraining,
    path: str,
    tokenizer: Tokenizer,
    max_length: int,
    mlm_prob: float,
    count: int,
    batch_size: int,
    device,
) -> dict[str, float]:
    """MLM accuracy (and the most-frequent-token baseline) on held-out text shards, fixed masks."""
    texts = TextDataset(path, tokenizer, max_length=max_length, seed=EVAL_SEED, mlm_prob=mlm_prob)
    batches = _batches(texts, min(count, len(texts)), batch_size)
    accuracy, baseline = masked_accuracy(model, batches, device, "mlm")
    return {"mlm_accuracy": accuracy, "mlm_baseline": baseline}


def evaluate(
    model: FlavaForPreTraining, config: RunConfig, tokenizer: Tokenizer | None, device: torch.device
) -> dict[str, float]:
    """The run config's `eval.*` evaluations (what `tools/evaluate.py` runs on a checkpoint, by the same calls)."""
    ev, crop = config.eval, model.config.image.image_size
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for path in ev.image_text:
        metrics.update(retrieval_metrics(model, path, tokenizer, crop, ev.max_samples, ev.batch_size, device))
        if model.config.mim_weight > 0:
            metrics.update(mim_metrics(model, path, crop, ev.max_samples, ev.batch_size, device))
    for path in ev.classification:
        metrics.update(
            zero_shot_classification(model, path, tokenizer, ev.prompts, crop, ev.max_samples, ev.batch_size, device)
        )
    for path in ev.text:
        data = config.data
        metrics.update(
            mlm_metrics(
                model, path, tokenizer, data.text_max_length, data.mlm_prob, ev.max_samples, ev.batch_size, device
            )
        )
    model.train(was_training)
    return metrics

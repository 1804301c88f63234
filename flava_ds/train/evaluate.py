"""Held-out evaluation: zero-shot image<->text retrieval R@1/5/10, zero-shot classification with caption
prompts, ITM accuracy, and MLM / MIM accuracy. Every rank runs the same evaluation (ZeRO-3 and tensor
parallelism need all ranks in each forward); rank 0 logs the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flava_ds.data.image_text import ImageAugment, ImageDataset, ImageTextDataset, collate_image
from flava_ds.data.sampler import SampleKey
from flava_ds.data.text_dataset import TextCollator, TextDataset
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model import FlavaForPreTraining
from flava_ds.parallel.layers import gather_vocab_logits
from flava_ds.train.config import RunConfig

EVAL_SEED = 2024  # fixed crops, masks and ITM negatives: the same held-out batches at every evaluation


def _batches(dataset, collate, count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield collate([dataset[SampleKey(i)] for i in range(start, min(count, start + batch_size))])


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


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
    on the dataset's samples (matched captions and negatives)."""
    image_emb, correct, seen = [], 0, 0
    for batch in _batches(dataset, dataset.collator(), count, batch_size):
        batch = _to(batch, device)
        image_emb.append(model.encode_image(batch["pixel_values"]))
        if model.config.itm_weight > 0:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                itm_labels=batch["itm_labels"],
            )
            correct += int((out.logits["itm"].argmax(-1) == batch["itm_labels"]).sum())
            seen += batch["itm_labels"].numel()
    captions = [(i, ids) for i in range(count) for ids in dataset.captions(i)]
    text_emb = []
    for start in range(0, len(captions), batch_size):
        chunk = [ids for _, ids in captions[start : start + batch_size]]
        text_emb.append(model.encode_text(*_padded(chunk, dataset.tokenizer.pad_id, device)))
    owner = torch.tensor([i for i, _ in captions], device=device)
    sim = torch.cat(image_emb).float() @ torch.cat(text_emb).float().t()
    metrics = retrieval_recall(sim, owner)
    metrics["retrieval/chance_R@1"] = 1.0 / count
    if seen:
        metrics["itm_accuracy"] = correct / seen
    return metrics


@torch.no_grad()
def masked_accuracy(model: FlavaForPreTraining, batches, device: torch.device, head: str) -> tuple[float, float]:
    """(accuracy, baseline): the baseline always predicts the most frequent target of these batches."""
    correct = total = 0
    counts: dict[int, int] = {}
    for batch in batches:
        batch = _to(batch, device)
        out = model(**batch)
        labels = (
            batch["mim_labels"].masked_select(batch["bool_masked_pos"])
            if head == "mim"
            else batch["mlm_labels"][batch["mlm_labels"] != -100]
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
def zero_shot_classification(
    model: FlavaForPreTraining,
    directory: str,
    tokenizer: Tokenizer,
    prompts: list[str],
    crop: int,
    count: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Classify each image by the nearest class embedding (prompt embeddings averaged per class)."""
    classes_path = Path(directory) / "classes.json"
    classes = json.loads(classes_path.read_text())
    names = sorted(classes, key=classes.get)
    class_emb = []
    for name in names:
        texts = [p.format(name.replace("_", " ")) for p in prompts]
        ids = [torch.tensor(tokenizer.encode(t, max_length=model.config.text.max_position_embeddings)) for t in texts]
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_id).to(device)
        emb = model.encode_text(input_ids, (input_ids != tokenizer.pad_id).long())
        class_emb.append(F.normalize(emb.mean(0), dim=-1))
    class_emb = torch.stack(class_emb)
    dataset = ImageDataset(directory, ImageAugment(crop_size=crop, flip=False), seed=EVAL_SEED)
    count = min(count, len(dataset))
    labels = torch.tensor([int(dataset.shards.row(i, ("label",))["label"]) for i in range(count)], device=device)
    predictions = []
    for batch in _batches(dataset, collate_image, count, batch_size):
        predictions.append((model.encode_image(batch["pixel_values"].to(device)) @ class_emb.t()).argmax(-1))
    accuracy = float((torch.cat(predictions) == labels).float().mean())
    majority = float(np.bincount(labels.cpu().numpy()).max() / count)
    return {"zero_shot/accuracy": accuracy, "zero_shot/chance": 1.0 / len(names), "zero_shot/majority": majority}


def evaluate(
    model: FlavaForPreTraining, config: RunConfig, tokenizer: Tokenizer | None, device: torch.device
) -> dict[str, float]:
    ev, crop = config.eval, model.config.image.image_size
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for path in ev.image_text:
        dataset = ImageTextDataset(
            path,
            tokenizer,
            ImageAugment(crop_size=crop, flip=False),
            seed=EVAL_SEED,
            itm_negative_prob=0.5 if model.config.itm_weight > 0 else 0.0,
        )
        count = min(ev.max_samples, len(dataset))
        metrics.update(image_text_metrics(model, dataset, count, ev.batch_size, device))
        if model.config.mim_weight > 0:
            image_set = ImageDataset(path, ImageAugment(crop_size=crop, flip=False), seed=EVAL_SEED)
            metrics["mim_accuracy"], metrics["mim_baseline"] = masked_accuracy(
                model, _batches(image_set, collate_image, count, ev.batch_size), device, "mim"
            )
    for path in ev.classification:
        metrics.update(
            zero_shot_classification(model, path, tokenizer, ev.prompts, crop, ev.max_samples, ev.batch_size, device)
        )
    for path in ev.text:
        dataset = TextDataset(path, tokenizer, max_length=config.data.text_max_length)
        collate = TextCollator(tokenizer, EVAL_SEED, config.data.mlm_prob)
        count = min(ev.max_samples, len(dataset))
        metrics["mlm_accuracy"], metrics["mlm_baseline"] = masked_accuracy(
            model, _batches(dataset, collate, count, ev.batch_size), device, "mlm"
        )
    model.train(was_training)
    return metrics

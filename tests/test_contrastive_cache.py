"""GradCache under gradient accumulation: micro-steps that score against the cached columns of the whole step
give the loss and every gradient of one pass over the global batch (one process; the distributed cases, 2 and
4 gloo ranks, run in tests/test_split_invariance.py)."""

from __future__ import annotations

import pytest
import torch

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from tests.model_inputs import make_batches

GLOBAL, ACCUM = 8, 4


def _model_and_batch() -> tuple[FlavaForPreTraining, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = FlavaConfig.preset("tiny")
    model = FlavaForPreTraining(cfg)
    batch = make_batches(cfg, batch=GLOBAL, seed=3)["image_text"]
    batch["itm_labels"] = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1])  # micro-batch 1 (rows 2, 3) has no matched pair
    return model, batch


def _step(model, micro_batches: list[dict], cached: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(each loss term of the step, the gradients) as the trainer computes them: micro-step losses / accumulation."""
    model.zero_grad()
    normalizers = model.loss_normalizers(micro_batches)
    cache = model.contrastive_cache(micro_batches) if cached else None
    terms: dict[str, float] = {}
    for m, batch in enumerate(micro_batches):
        out = model(**batch, loss_normalizers=normalizers, contrastive_cache=cache.at(m) if cache else None)
        (out.loss / len(micro_batches)).backward()
        for name, value in out.losses.items():
            terms[name] = terms.get(name, 0.0) + float(value.detach()) / len(micro_batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum((a[k].double() - b[k].double()).square().sum() for k in a).sqrt()
    return float(diff / sum(v.double().square().sum() for v in a.values()).sqrt())


def test_cached_micro_steps_equal_one_pass_over_the_global_batch():
    model, batch = _model_and_batch()
    one_terms, one_grads = _step(model, [batch], cached=False)
    terms, grads = _step(model, _split(batch, ACCUM), cached=True)
    assert sorted(terms) == sorted(one_terms)
    for name, value in one_terms.items():
        assert terms[name] == pytest.approx(value, rel=1e-5), name
    assert sorted(grads) == sorted(one_grads)
    for name in ("logit_scale", "image_projection.weight", "text_projection.weight"):  # the contrastive's own
        assert _relative_difference({name: one_grads[name]}, {name: grads[name]}) < 1e-5, name
    assert _relative_difference(one_grads, grads) < 1e-5


def test_without_the_cache_the_contrastive_term_sees_one_micro_batch():
    """The control: the same micro-steps without the cache score 2 columns per row, not 8, so the contrastive
    term and its gradients differ (what the cache is for)."""
    model, batch = _model_and_batch()
    one_terms, one_grads = _step(model, [batch], cached=False)
    terms, grads = _step(model, _split(batch, ACCUM), cached=False)
    assert abs(terms["global_contrastive"] - one_terms["global_contrastive"]) > 0.1 * one_terms["global_contrastive"]
    assert terms["mmm_text"] == pytest.approx(one_terms["mmm_text"], rel=1e-5)  # the other terms agree already
    assert _relative_difference(one_grads, grads) > 1e-3

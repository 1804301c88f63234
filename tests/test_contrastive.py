"""The global contrastive loss across real processes equals a single process over the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.contrastive_reference import contrastive_model, global_batch
from tests.launch import ROOT, run_worker


def _run(world: int, variant: str, out: Path) -> dict:
    run_worker(ROOT / "tests" / "contrastive_worker.py", world, str(out), variant)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    for other in ranks[1:]:  # after the all-reduce every rank holds the same averaged gradients
        for name, grad in ranks[0]["grads"].items():
            torch.testing.assert_close(other["grads"][name], grad)
    return ranks[0]


@pytest.fixture(scope="module")
def single_process():
    model = contrastive_model()
    loss = model(**global_batch(model.config)).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("world", [2, 4])
def test_global_contrastive_matches_single_process(world, single_process, tmp_path):
    got = _run(world, "global", tmp_path)
    torch.testing.assert_close(got["loss"], single_process["loss"], atol=1e-5, rtol=1e-5)
    assert got["grads"].keys() == single_process["grads"].keys()
    for name, grad in single_process["grads"].items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_local_gradient_variant_differs(single_process, tmp_path):
    """CLIP-style gathering without gradient: same loss value, different gradients (the paper's ablation)."""
    got = _run(2, "local", tmp_path)
    torch.testing.assert_close(got["loss"], single_process["loss"], atol=1e-5, rtol=1e-5)
    differs = [
        n for n, g in single_process["grads"].items() if not torch.allclose(got["grads"][n], g, atol=1e-5, rtol=1e-3)
    ]
    assert "image_projection.weight" in differs and "text_projection.weight" in differs

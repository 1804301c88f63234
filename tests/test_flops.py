"""The analytic model FLOPs behind TFLOP/s and MFU agree with what torch counts in a real forward + backward,
for the loss weights and batch kinds of each shipped config (FLAVA_C runs no masked view and no fusion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from flava_ds.batch import Batch
from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.flops import batch_flops
from tests.model_inputs import make_batches

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _runs() -> list[tuple[str, str]]:
    """(config, batch kind) for each kind a config trains."""
    runs = []
    for name in ("flava_full", "flava_c", "flava_mm"):
        ratios = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["kind_ratios"]
        runs += [(name, kind) for kind, ratio in ratios.items() if ratio > 0]
    return runs


@pytest.mark.parametrize(("config", "kind"), _runs())
def test_batch_flops_match_counted_matmuls(config, kind):
    """The config's loss weights on the `small` encoders (the `full` ones are slow on a CPU); eager attention,
    whose matmuls torch counts (not those of the fused CPU SDPA kernel)."""
    run = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    overrides = run["model"].get("overrides", {})
    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("small", attn_impl="eager", **overrides))
    batch = Batch(**make_batches(model.config, batch=6, seq_len=24, seed=1)[kind])
    assert batch.kind == kind
    if kind == "image_text" and run["data"].get("itm_negative_prob") == 0:
        batch.itm_labels = torch.ones_like(batch.itm_labels)  # every pair matched, as the loader gives
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    # the analytic count leaves out filler queries (rows with fewer targets than the longest) and the padded
    # keys eager attention computes
    assert counter.get_total_flops() == pytest.approx(batch_flops(model.config, batch), rel=0.05)

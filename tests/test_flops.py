"""The analytic model FLOPs behind TFLOP/s and MFU agree with what torch counts in a real forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.flops import batch_flops
from tests.model_inputs import make_batches


@pytest.mark.parametrize("kind", ["image_text", "image", "text"])
def test_batch_flops_match_counted_matmuls(kind):
    torch.manual_seed(0)
    model = FlavaForPreTraining(FlavaConfig.preset("small"))
    batch = make_batches(model.config, batch=6, seq_len=24, seed=1)[kind]
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    # the analytic count leaves out the few matmuls with no input gradient (patch embedding) and filler queries
    assert counter.get_total_flops() == pytest.approx(batch_flops(model.config, kind, batch), rel=0.05)

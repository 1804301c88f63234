"""FlavaConfig.compile: torch.compile'd blocks give the eager model's losses and gradients, with the same state dict."""

from __future__ import annotations

import torch

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from tests.model_inputs import make_batches


def test_compiled_blocks_match_eager():
    torch.manual_seed(3)
    eager = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    compiled = FlavaForPreTraining(FlavaConfig.preset("tiny", compile=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    batch = make_batches(eager.config, seed=5)["image_text"]
    loss_eager, loss_compiled = eager(**batch).loss, compiled(**batch).loss
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    loss_eager.backward()
    loss_compiled.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:  # zero-initialised CLS/position rows give huge (1e5) gradients: compare relative
            scale = max(1.0, a.grad.abs().max().item())
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)

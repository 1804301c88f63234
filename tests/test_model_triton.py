"""The model with `attn_impl: triton` equals `sdpa` on the tiny preset (Triton interpreter on CPU).

Triton fixes its interpreter mode when it is first imported, so the comparison runs in a child process
started with TRITON_INTERPRET=1 (see tests/test_kernels.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import ROOT, python_env

pytest.importorskip("triton")

CHILD = r"""
import torch
from flava_ds.model import FlavaConfig, FlavaForPreTraining
from tests.model_inputs import make_batches

torch.manual_seed(0)
sdpa = FlavaForPreTraining(FlavaConfig.preset("tiny", attn_impl="sdpa"))
triton = FlavaForPreTraining(FlavaConfig.preset("tiny", attn_impl="triton"))
triton.load_state_dict(sdpa.state_dict())
for kind, batch in make_batches(sdpa.config, batch=3, seq_len=7, seed=1).items():
    a, b = sdpa(**batch), triton(**batch)
    assert a.losses.keys() == b.losses.keys()
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name], atol=1e-5, rtol=1e-5)
    sdpa.zero_grad(); triton.zero_grad()
    a.loss.backward(); b.loss.backward()
    for (name, pa), pb in zip(sdpa.named_parameters(), triton.parameters()):
        if pa.grad is not None:
            scale = max(1.0, pa.grad.abs().max().item())
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5 * scale, rtol=1e-4, msg=f"{kind} {name}")
    print("ok", kind)
"""


def test_triton_attention_model_equals_sdpa():
    env = python_env({"TRITON_INTERPRET": "1"})
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["ok", "image_text", "ok", "image", "ok", "text"]

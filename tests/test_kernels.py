"""Fused Triton attention checked against torch SDPA (outputs and q/k/v gradients).

With a CUDA GPU the kernels run in-process. Without one they run in Triton's CPU interpreter, which only
works when TRITON_INTERPRET=1 is set before ``triton.language`` is imported (Triton decorates its own
language functions at import). Other test modules may import triton first, and setting the variable here
would leak into them, so a single child process started with the variable set runs every kernel case;
this module builds the inputs and compares the child's results with SDPA computed in this process.
Checks that need a clean process (no interpreter, no Triton, compiling for the GPU) run in subprocesses too.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from flava_ds.kernels import flash_attention
from tests.launch import ROOT, python_env

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    padding: str = "none"  # "none", "random" (random length per item) or "empty_item" (item 1 all padding)
    scale: float | None = None
    dtype: torch.dtype = torch.float32
    packed: bool = False  # q, k, v as strided views of one (B, N, 3, H, D) projection, as the model makes them


FP32_CASES = {
    f"{name}-{padding}": Case(*shape, padding=padding, scale=scale)
    for name, shape, scale in [
        ("seq7-d32", (2, 3, 7, 7, 32), None),
        ("seq33-d64", (2, 2, 33, 33, 64), None),
        ("seq77-d64", (2, 1, 77, 77, 64), None),
        ("seq40-d128", (1, 2, 40, 40, 128), None),
        ("q19-k50-d32-scale0.3", (2, 2, 19, 50, 32), 0.3),  # cross-attention shape, explicit scale
    ]
    for padding in ("none", "random")
}
CASES = {
    **FP32_CASES,
    "empty_item": Case(3, 2, 21, 21, 32, padding="empty_item"),
    "packed": Case(2, 3, 29, 29, 32, padding="random", packed=True),
    "fp16": Case(2, 2, 45, 45, 64, padding="random", dtype=torch.float16),
    "bf16": Case(2, 2, 45, 45, 64, padding="random", dtype=torch.bfloat16),
}


def _make_inputs(case: Case, seed: int, device: str) -> Tensors:
    """Seeded on the CPU, so the kernel process and the reference here build identical inputs."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, D = case.batch, case.heads, case.seq_q, case.seq_k, case.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, case.dtype)

    if case.packed:
        assert Nq == Nk
        q, k, v = randn(B, Nk, 3, H, D).permute(2, 0, 3, 1, 4)
        grad_out = randn(B, Nq, H, D).transpose(1, 2)  # strided too
    else:
        q, k, v = randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, D)
        grad_out = randn(B, H, Nq, D)
    inputs = {"q": q, "k": k, "v": v, "grad_out": grad_out}
    if case.padding != "none":
        lengths = torch.randint(1, Nk + 1, (B,), generator=gen)
        lengths[0] = Nk  # keep one unpadded item next to padded ones
        if case.padding == "empty_item":
            lengths[1] = 0
        inputs["mask"] = (torch.arange(Nk)[None, :] < lengths[:, None]).to(device)
    return inputs


def _all_inputs(device: str) -> dict[str, Tensors]:
    return {name: _make_inputs(case, seed, device) for seed, (name, case) in enumerate(CASES.items())}


def _dot_probe_kernel(X, Y):
    offs = tl.arange(0, 16)
    x = tl.load(X + offs[:, None] * 16 + offs[None, :])
    tl.store(Y + offs[:, None] * 16 + offs[None, :], tl.dot(x, x))


def _interpreter_bf16_dot_ok() -> bool:
    """Whether this Triton's interpreter computes tl.dot on bf16 correctly (3.9 multiplies the raw bits)."""
    x = torch.randn(16, 16).bfloat16()
    y = torch.empty(16, 16)
    triton.jit(_dot_probe_kernel)[(1,)](x, y)
    return torch.allclose(y, x.float() @ x.float(), atol=1e-2, rtol=1e-2)


def _run_flash(inputs: Tensors, scale: float | None) -> Tensors:
    leaves = [inputs[name].requires_grad_() for name in "qkv"]
    out = flash_attention(*leaves, key_padding_mask=inputs.get("mask"), softmax_scale=scale)
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"])
    return {"out": out.detach().cpu(), **{f"d{n}": g.cpu() for n, g in zip("qkv", grads)}}


def run_cases() -> dict[str, Tensors | str]:
    """Run every case on DEVICE; a failure becomes its traceback (text), a skip a 'skip: reason' string."""
    bf16_ok = DEVICE == "cuda" or _interpreter_bf16_dot_ok()
    results: dict[str, Tensors | str] = {}
    for name, inputs in _all_inputs(DEVICE).items():
        case = CASES[name]
        if case.dtype == torch.bfloat16 and not bf16_ok:
            results[name] = "skip: this Triton's CPU interpreter computes tl.dot on bf16 operands incorrectly"
            continue
        try:
            results[name] = _run_flash(inputs, case.scale)
        except Exception:
            results[name] = traceback.format_exc()
    return results


_CHILD = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("kernel_cases_child", sys.argv[1])
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
torch.save(module.run_cases(), sys.argv[2])
"""


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[Case, Tensors, Tensors | str]]:
    """Kernel results for every case (computed once), next to the CPU inputs for the reference."""
    if DEVICE == "cuda":
        outputs = run_cases()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = Path(tmp, "results.pt")
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, __file__, str(out_path)],
                env=python_env({"TRITON_INTERPRET": "1"}), cwd=ROOT, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-4000:]
            outputs = torch.load(out_path, weights_only=False)
    return {name: (CASES[name], inputs, outputs[name]) for name, inputs in _all_inputs("cpu").items()}


def _case_result(results: dict[str, Any], name: str) -> tuple[Case, Tensors, Tensors]:
    case, inputs, got = results[name]
    if isinstance(got, str):
        if got.startswith("skip: "):
            pytest.skip(got.removeprefix("skip: "))
        pytest.fail(f"kernel raised:\n{got}")
    return case, inputs, got


def _sdpa_with_grads(inputs: Tensors, scale: float | None, items: list[int] | None = None) -> Tensors:
    """fp32 SDPA reference (boolean mask from the padding mask) for the chosen batch items."""
    pick = (lambda t: t[items]) if items is not None else (lambda t: t)
    leaves = [pick(inputs[name]).float().requires_grad_() for name in "qkv"]
    mask = inputs.get("mask")
    attn_mask = None if mask is None else pick(mask)[:, None, None, :]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, scale=scale)
    grads = torch.autograd.grad(out, leaves, pick(inputs["grad_out"]).float())
    return {"out": out.detach(), **{f"d{n}": g for n, g in zip("qkv", grads)}}


def _assert_matches(got: Tensors, expected: Tensors, tol: float, items: list[int] | None = None) -> None:
    for key, want in expected.items():
        have = got[key] if items is None else got[key][items]
        torch.testing.assert_close(have.float(), want, atol=tol, rtol=tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", list(FP32_CASES))
def test_matches_sdpa_fp32(results: dict[str, Any], name: str) -> None:
    case, inputs, got = _case_result(results, name)
    assert got["out"].shape == inputs["q"].shape and got["out"].dtype == torch.float32
    _assert_matches(got, _sdpa_with_grads(inputs, case.scale), 1e-4)


def test_fully_padded_item_gives_zeros_not_nan(results: dict[str, Any]) -> None:
    case, inputs, got = _case_result(results, "empty_item")
    for key, t in got.items():
        assert torch.isfinite(t).all(), f"{key} has NaN/inf"
        assert torch.count_nonzero(t[1]) == 0, f"{key} is not zero for the fully padded item"
    padded_keys = ~inputs["mask"][:, None, :, None]
    for key in ("dk", "dv"):
        assert torch.count_nonzero(got[key] * padded_keys) == 0, f"{key} is not zero at padded keys"
    keep = [0, 2]  # SDPA itself yields NaN for an item with no valid key, so compare the others with it
    _assert_matches(got, _sdpa_with_grads(inputs, case.scale, keep), 1e-4, keep)


def test_non_contiguous_inputs_and_grad(results: dict[str, Any]) -> None:
    case, inputs, got = _case_result(results, "packed")
    assert not inputs["q"].is_contiguous() and not inputs["grad_out"].is_contiguous()
    _assert_matches(got, _sdpa_with_grads(inputs, case.scale), 1e-4)


@pytest.mark.parametrize(("name", "out_tol", "grad_tol"), [("fp16", 5e-3, 1e-2), ("bf16", 2e-2, 5e-2)])
def test_low_precision_matches_sdpa(results: dict[str, Any], name: str, out_tol: float, grad_tol: float) -> None:
    case, inputs, got = _case_result(results, name)
    assert all(t.dtype == case.dtype for t in got.values())
    expected = _sdpa_with_grads(inputs, case.scale)  # fp32 math on the same low-precision inputs
    torch.testing.assert_close(got["out"].float(), expected.pop("out"), atol=out_tol, rtol=out_tol)
    _assert_matches(got, expected, grad_tol)


def test_rejects_bad_inputs() -> None:
    q = torch.randn(1, 2, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, q, q)
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q, q.double())


def _run_python(code: str, env_updates: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=python_env(env_updates), cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cpu_tensors_without_interpreter_raise_clear_error() -> None:
    result = _run_python(
        """
        import os
        import torch
        from flava_ds.kernels import flash_attention
        q = torch.randn(1, 1, 4, 16)
        for interpret in (None, "1"):  # unset, then set only after triton was imported
            if interpret:
                os.environ["TRITON_INTERPRET"] = interpret
            try:
                flash_attention(q, q, q)
            except RuntimeError as err:
                print(err)
            else:
                print("NO ERROR")
            print("----")
        """,
        {"TRITON_INTERPRET": None},
    )
    assert result.returncode == 0, result.stderr
    unset, late = result.stdout.split("----")[:2]
    assert "CUDA" in unset and "attn_impl='sdpa'" in unset and "TRITON_INTERPRET=1" in unset, unset
    assert "before anything imports triton" in late, late


def test_import_without_triton_and_clear_error() -> None:
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from flava_ds.kernels import flash_attention, triton_available
        assert not triton_available()
        q = torch.randn(1, 1, 4, 16)
        try:
            flash_attention(q, q, q)
        except RuntimeError as err:
            print(err)
        """,
        {},
    )
    assert result.returncode == 0, result.stderr
    assert "triton" in result.stdout and "attn_impl='sdpa'" in result.stdout, result.stdout


def test_gpu_kernels_compile_for_ampere_and_hopper() -> None:
    """The interpreter cannot catch GPU codegen errors; compile (no launch, no GPU needed) for sm_80 and sm_90."""
    result = _run_python(
        """
        import importlib
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fa = importlib.import_module("flava_ds.kernels.flash_attention")
        kernels = fa._kernels()
        pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "dOut": "*bf16", "dQ": "*bf16",
                    "dK": "*bf16", "dV": "*bf16", "Mask": "*u8", "Lse": "*fp32", "Delta": "*fp32"}
        for arch, head_dim in ((90, 64), (90, 128), (80, 64)):
            for name in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"):
                kernel = getattr(kernels, name)
                if isinstance(kernel, triton.runtime.Autotuner):
                    config, fn = kernel.configs[0], kernel.fn
                    consts = {**config.kwargs, "HAS_MASK": True, "DOT_PRECISION": "tf32", "BLOCK_D": head_dim}
                else:
                    config, fn = triton.Config({}, num_warps=4, num_stages=1), kernel
                    consts = {"BLOCK_M": 64, "BLOCK_D": head_dim}
                signature = {
                    arg: "constexpr" if arg in consts else pointers.get(arg, "fp32" if arg.endswith("scale") else "i32")
                    for arg in fn.arg_names
                }
                compiled = triton.compile(
                    ASTSource(fn, signature, consts), target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                )
                assert name == "bwd_preprocess" or "mma" in compiled.asm["ptx"], f"{name}: no tensor-core MMA"
        print("compiled")
        """,
        {"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": "1"},
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

"""Fused bidirectional attention in Triton (FlashAttention-2 forward and backward).

The forward pass streams key/value blocks through an online softmax (running max and sum, fp32
accumulation) and keeps only the output and one log-sum-exp per query row, so no (seq x seq) tensor
is ever stored. The backward pass recomputes the attention probabilities from q, k and the saved
log-sum-exp: a preprocess kernel computes ``delta = rowsum(dO * O)``, one kernel per key block
accumulates dK and dV, and a separate kernel per query block accumulates dQ (no atomics, so the
gradients are deterministic).

The kernels and their helpers are plain functions decorated with ``triton.jit`` on first call, so
importing this module needs no Triton (the annotations stay strings) and calling it without Triton
gives a clear error.
Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs them on CPU tensors for correctness checks;
Triton fixes that mode for its own language functions when ``triton.language`` is imported, so the
variable has to be set before that, and a mismatch is reported rather than left to fail obscurely.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are optional: calling them explains what to use instead
    triton = None
    tl = None

__all__ = ["flash_attention", "triton_available"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = math.log2(math.e)


def triton_available() -> bool:
    """Whether Triton is importable (it says nothing about a GPU being present)."""
    return triton is not None


# ---------------------------------------------------------------------------------------------------------
# Kernels. Scores are kept in base 2 (``qk_scale = softmax_scale * log2(e)``) so that exp2 can be used.
# The saved LSE is therefore ``log2(sum_j 2^(s_ij))`` of the scaled base-2 scores, and it is +inf for a
# query row whose keys are all padding: every probability recomputed from it is exp2(-inf) = 0.
# Each program handles one tile of rows of one (batch, head); the grid is flat, tile index fastest.
# ---------------------------------------------------------------------------------------------------------


def _program_tile(seq, num_heads, BLOCK: tl.constexpr):
    """This program's rows (of a sequence of ``seq``), which of them exist, and its (batch, head) pair."""
    num_blocks = tl.cdiv(seq, BLOCK)
    pid = tl.program_id(0)
    pid_tile = pid % num_blocks
    pid_bh = pid // num_blocks
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs = pid_tile * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < seq, pid_bh, b, h


def _load_tile(base, offs, in_range, offs_d, stride_row, stride_d):
    """Rows ``offs`` x columns ``offs_d`` of one head's (seq, head_dim) matrix; zeros past its end."""
    return tl.load(base + offs[:, None] * stride_row + offs_d[None, :] * stride_d, mask=in_range[:, None], other=0.0)


def _store_tile(base, offs, in_range, offs_d, stride_row, stride_d, value):
    """``value`` into rows ``offs`` x columns ``offs_d`` of one head's matrix, in its element type."""
    tl.store(
        base + offs[:, None] * stride_row + offs_d[None, :] * stride_d,
        value.to(base.dtype.element_ty),
        mask=in_range[:, None],
    )


def _load_keys(
    k_base, v_base, mask_base, offs_n, seq_k, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Keys and values at rows ``offs_n``, and which of them take part: in range and, with a mask, real."""
    in_range = offs_n < seq_k
    k = _load_tile(k_base, offs_n, in_range, offs_d, stride_kn, stride_kd)
    v = _load_tile(v_base, offs_n, in_range, offs_d, stride_vn, stride_vd)
    col_ok = in_range
    if HAS_MASK:
        keep = tl.load(mask_base + offs_n * stride_mask_n, mask=in_range, other=0)
        col_ok = col_ok & (keep != 0)
    return k, v, col_ok


def _scores(q, k, col_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """Base-2 scores of queries ``q`` against keys ``k``; -inf where a key takes no part."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    return tl.where(col_ok[None, :], s, float("-inf"))


def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mask_b, stride_mask_n,
    num_heads, seq_q, seq_k, seq_bucket, qk_scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program computes BLOCK_M output rows of one (batch, head), sweeping all key blocks with an online
    softmax; ``seq_bucket`` is only an autotune key."""
    offs_m, row_ok, pid_bh, b, h = _program_tile(seq_q, num_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, row_ok, offs_d, stride_qm, stride_qd)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mask_b

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        k, v, col_ok = _load_keys(
            k_base, v_base, mask_base, start_n + tl.arange(0, BLOCK_N), seq_k, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, HAS_MASK,
        )  # fmt: skip
        s = _scores(q, k, col_ok, qk_scale, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys its max is -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    no_keys = l_i == 0.0
    l_safe = tl.where(no_keys, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_tile(Out + b * stride_ob + h * stride_oh, offs_m, row_ok, offs_d, stride_om, stride_od, out)
    lse = tl.where(no_keys, float("inf"), m_i + tl.log2(l_safe))
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


def _attn_bwd_preprocess_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, seq_q,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id, the row term of the softmax gradient, in fp32."""
    offs_m, row_ok, pid_bh, b, h = _program_tile(seq_q, num_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b * stride_ob + h * stride_oh, offs_m, row_ok, offs_d, stride_om, stride_od)
    do = _load_tile(dOut + b * stride_dob + h * stride_doh, offs_m, row_ok, offs_d, stride_dom, stride_dod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=row_ok)


def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mask_b, stride_mask_n,
    num_heads, seq_q, seq_k, seq_bucket, qk_scale, sm_scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program owns BLOCK_N keys of one (batch, head) and sweeps all query blocks for dK and dV.

    Everything is computed transposed (keys as rows) so the block's dK/dV accumulate without atomics.
    """
    offs_n, in_range, pid_bh, b, h = _program_tile(seq_k, num_heads, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, col_ok = _load_keys(
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, Mask + b * stride_mask_b,
        offs_n, seq_k, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, HAS_MASK,
    )  # fmt: skip

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = dOut + b * stride_dob + h * stride_doh
    row_stats = pid_bh.to(tl.int64) * seq_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, seq_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_q
        q = _load_tile(q_base, offs_m, row_ok, offs_d, stride_qm, stride_qd)
        do = _load_tile(do_base, offs_m, row_ok, offs_d, stride_dom, stride_dod)
        # +inf LSE makes padded-out query rows (and rows with no valid key) contribute exactly zero.
        lse = tl.load(Lse + row_stats + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row_stats + offs_m, mask=row_ok, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(tl.where(col_ok[:, None], s_t, float("-inf")) - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    _store_tile(dK + b * stride_dkb + h * stride_dkh, offs_n, in_range, offs_d, stride_dkn, stride_dkd, dk)
    _store_tile(dV + b * stride_dvb + h * stride_dvh, offs_n, in_range, offs_d, stride_dvn, stride_dvd, dv)


def _attn_bwd_dq_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mask_b, stride_mask_n,
    num_heads, seq_q, seq_k, seq_bucket, qk_scale, sm_scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program owns BLOCK_M queries of one (batch, head) and sweeps all key blocks for dQ."""
    offs_m, row_ok, pid_bh, b, h = _program_tile(seq_q, num_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, row_ok, offs_d, stride_qm, stride_qd)
    do = _load_tile(dOut + b * stride_dob + h * stride_doh, offs_m, row_ok, offs_d, stride_dom, stride_dod)
    row_stats = pid_bh.to(tl.int64) * seq_q
    lse = tl.load(Lse + row_stats + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_stats + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mask_b
    for start_n in range(0, seq_k, BLOCK_N):
        k, v, col_ok = _load_keys(
            k_base, v_base, mask_base, start_n + tl.arange(0, BLOCK_N), seq_k, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, HAS_MASK,
        )  # fmt: skip
        p = tl.exp2(_scores(q, k, col_ok, qk_scale, DOT_PRECISION) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    _store_tile(dQ + b * stride_dqb + h * stride_dqh, offs_m, row_ok, offs_d, stride_dqm, stride_dqd, dq)


_HELPERS = (_program_tile, _load_tile, _store_tile, _load_keys, _scores)


# ---------------------------------------------------------------------------------------------------------
# Autotuning and kernel construction
# ---------------------------------------------------------------------------------------------------------

_AUTOTUNE_KEY = ["seq_bucket", "BLOCK_D"]
_PREPROCESS_BLOCK_M = 64
# The sequence arguments only feed masks, so specialising on their divisibility would just add compiles.
_NO_SPECIALIZE = ["seq_q", "seq_k", "seq_bucket"]


@dataclass(frozen=True)
class _Kernels:
    fwd: Any
    bwd_preprocess: Any
    bwd_dkdv: Any
    bwd_dq: Any


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> Any:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _autotune_configs(kind: str, interpret: bool) -> list[Any]:
    """Candidate tilings for ``kind`` ('fwd' or 'bwd'); one small tile under the interpreter (no tuning).

    In the backward kernels BLOCK_M tiles queries and BLOCK_N tiles keys, as in the forward. The lists
    stay short because every candidate is compiled for each (dtype, head_dim, mask) variant.
    """
    if interpret:
        # Unequal tiles so CPU tests catch any mix-up of the query and key block sizes.
        return [_config(32, 16, 4, 1)] if kind == "fwd" else [_config(16, 32, 4, 1)]
    major, _ = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
    if kind == "fwd":
        if major >= 9:  # Hopper (H100/H200): large query tiles, deeper pipelines
            return [
                _config(128, 64, 4, 3),
                _config(128, 64, 8, 3),
                _config(128, 64, 8, 4),
                _config(128, 128, 8, 2),
                _config(64, 64, 4, 3),
            ]
        # Ampere (A100) and older: less shared memory, so shallower pipelines and narrower key tiles
        return [
            _config(128, 64, 4, 2),
            _config(128, 64, 8, 3),
            _config(64, 64, 4, 3),
            _config(128, 32, 4, 3),
            _config(64, 32, 4, 2),
        ]
    if major >= 9:  # 128 x 128 backward tiles spill registers at head_dim 64 and above
        return [_config(64, 64, 4, 2), _config(64, 64, 4, 3), _config(64, 128, 8, 2), _config(128, 64, 8, 2)]
    return [_config(64, 64, 4, 2), _config(32, 64, 4, 2), _config(64, 32, 4, 2), _config(64, 128, 8, 2)]


@functools.cache
def _kernels() -> _Kernels:
    """Decorate the kernels once; ``_check_runnable`` has made sure the interpreter switch is consistent.

    Kernels call their helpers by module-level name, so those names are rebound to the jitted helpers first.
    """
    interpret = _interpret_mode()
    globals().update({helper.__name__: triton.jit(helper) for helper in _HELPERS})

    def tuned(fn: Any, kind: str) -> Any:
        jitted = triton.jit(fn, do_not_specialize=_NO_SPECIALIZE)
        return triton.autotune(_autotune_configs(kind, interpret), key=_AUTOTUNE_KEY, cache_results=True)(jitted)

    return _Kernels(
        fwd=tuned(_attn_fwd_kernel, "fwd"),
        bwd_preprocess=triton.jit(_attn_bwd_preprocess_kernel, do_not_specialize=["seq_q"]),
        bwd_dkdv=tuned(_attn_bwd_dkdv_kernel, "bwd"),
        bwd_dq=tuned(_attn_bwd_dq_kernel, "bwd"),
    )


def _interpret_mode() -> bool:
    """Whether ``triton.jit`` would build interpreter kernels now (TRITON_INTERPRET as Triton parses it)."""
    return bool(triton.knobs.runtime.interpret)


def _language_interpreted() -> bool:
    """Whether ``triton.language`` was imported under the interpreter (its reductions are then not JIT)."""
    return not isinstance(tl.sum, triton.runtime.JITFunction)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


def _check_runnable(q: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(
            "flash_attention needs the `triton` package, which is not installed. "
            "Use attn_impl='sdpa' (torch.nn.functional.scaled_dot_product_attention) instead."
        )
    interpret = _interpret_mode()
    if not q.is_cuda and not interpret:
        raise RuntimeError(
            f"flash_attention got tensors on '{q.device}', but its Triton kernels run on CUDA GPUs. "
            "Use attn_impl='sdpa' on this device, or set TRITON_INTERPRET=1 in the environment (before "
            "triton is imported) to run the kernels in Triton's CPU interpreter (slow; for correctness checks)."
        )
    if interpret != _language_interpreted():
        raise RuntimeError(
            f"TRITON_INTERPRET is {'set' if interpret else 'unset'} now but was "
            f"{'set' if not interpret else 'unset'} when triton.language was imported, and Triton fixes the "
            "interpreter mode at import. Set TRITON_INTERPRET before anything imports triton "
            "(e.g. in the environment of the process), or leave it unset to use the GPU."
        )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "q, k, v must share batch, heads and head_dim (k and v also seq); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one dtype out of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attention supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[3]}; "
            "use attn_impl='sdpa' for other head sizes."
        )
    if key_padding_mask is not None:
        expected = (k.shape[0], k.shape[2])
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape {expected} (True = real token); "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device, which need not be the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _seq_bucket(seq_q: int, seq_k: int) -> int:
    return max(16, triton.next_power_of_2(max(seq_q, seq_k)))


def _mask_args(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Kernel arguments for the padding mask; with no mask any pointer will do, it is never read."""
    if mask is None:
        return fallback, 0, 0
    as_bytes = mask.view(torch.uint8)  # bool and uint8 share a layout; Triton loads bytes more simply
    return as_bytes, as_bytes.stride(0), as_bytes.stride(1)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 (no TF32) so the kernel matches the eager reference; 16-bit inputs use MMA anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q)  # same layout as q, so a (B, N, H, D) view of it stays free
    lse = torch.empty((batch, heads, seq_q), device=q.device, dtype=torch.float32)
    mask_arg, mask_stride_b, mask_stride_n = _mask_args(mask, q)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)

    _kernels().fwd[grid](
        q, k, v, mask_arg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask_stride_b, mask_stride_n,
        heads, seq_q, seq_k, _seq_bucket(seq_q, seq_k), sm_scale * _LOG2E,
        HAS_MASK=mask is not None, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=head_dim,
    )  # fmt: skip
    return out, lse


def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    kernels = _kernels()
    delta = torch.empty_like(lse)
    kernels.bwd_preprocess[(triton.cdiv(seq_q, _PREPROCESS_BLOCK_M) * batch * heads,)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_q,
        BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=head_dim,
    )  # fmt: skip

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_arg, mask_stride_b, mask_stride_n = _mask_args(mask, q)
    common = {"HAS_MASK": mask is not None, "DOT_PRECISION": _dot_precision(q.dtype), "BLOCK_D": head_dim}
    scalars = (heads, seq_q, seq_k, _seq_bucket(seq_q, seq_k), sm_scale * _LOG2E, sm_scale)

    def dkdv_grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(seq_k, meta["BLOCK_N"]) * batch * heads,)

    kernels.bwd_dkdv[dkdv_grid](
        q, k, v, mask_arg, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        mask_stride_b, mask_stride_n, *scalars, **common,
    )  # fmt: skip

    def dq_grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)

    kernels.bwd_dq[dq_grid](
        q, k, v, mask_arg, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        mask_stride_b, mask_stride_n, *scalars, **common,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        sm_scale: float,
    ) -> torch.Tensor:
        with _device_guard(q):
            out, lse = _forward(q, k, v, key_padding_mask, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.sm_scale = sm_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        with _device_guard(q):
            dq, dk, dv = _backward(grad_out, q, k, v, out, lse, key_padding_mask, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional softmax attention ``softmax(q k^T * scale) v`` with fused Triton kernels.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); one dtype out of
    fp32/fp16/bf16, any strides, head_dim in 16/32/64/128. ``key_padding_mask`` is (batch, seq_k) bool
    with True for real tokens; padded keys get zero weight, and a query whose keys are all padding
    gets a zero output and zero gradients. ``softmax_scale`` defaults to 1/sqrt(head_dim).
    Returns a tensor shaped and typed like q. Raises RuntimeError when the kernels cannot run here
    (no Triton, or CPU tensors without TRITON_INTERPRET=1); it never falls back silently.
    """
    _check_inputs(q, k, v, key_padding_mask)
    _check_runnable(q)
    scale = softmax_scale if softmax_scale is not None else q.shape[3] ** -0.5
    return _FlashAttentionFunction.apply(q, k, v, key_padding_mask, float(scale))

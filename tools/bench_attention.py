#!/usr/bin/env python
"""Attention kernel benchmark on one CUDA GPU: flava_ds Triton flash attention vs torch SDPA backends.

  python tools/bench_attention.py                          # FLAVA lengths 77/197/275/512, D=64, bf16
  python tools/bench_attention.py --json bench.json        # also write the rows as JSON
  python tools/bench_attention.py --model --model-batch 64 # plus a whole FLAVA training step per attn_impl

For each sequence length the batch is sized to about --tokens tokens (12 heads), so every kernel fills the
GPU. Forward and forward+backward times are medians over --iters CUDA-event-timed runs after --warmup
runs (the warm-up also absorbs Triton autotuning). FLOPs: forward 4*B*H*N*N*D, backward 2.5x forward; a
padding mask does not reduce the count. SDPA's FLASH backend takes no mask, so it runs unmasked; the
EFFICIENT backend and our kernel run both ways; eager is matmul + softmax + matmul with the mask.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SEQ_LENS = (77, 197, 275, 512)  # text, image (196 patches + CLS), multimodal (197 + 77 + CLS), BERT max
HEADS = 12
HEAD_DIM = 64

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Row:
    method: str
    masked: bool
    seq: int
    batch: int
    fwd_ms: float
    fwd_tflops: float
    fwd_bwd_ms: float
    fwd_bwd_tflops: float


def _sdpa(backend: SDPBackend) -> AttnFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with sdpa_kernel(backend):
            attn_mask = None if mask is None else mask[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    return run


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from flava_ds.kernels import flash_attention

    return flash_attention(q, k, v, key_padding_mask=mask)


# (name, function, runs with the padding mask?)
METHODS: list[tuple[str, AttnFn, bool]] = [
    ("triton", _triton, False),
    ("triton", _triton, True),
    ("sdpa_flash", _sdpa(SDPBackend.FLASH_ATTENTION), False),
    ("sdpa_efficient", _sdpa(SDPBackend.EFFICIENT_ATTENTION), False),
    ("sdpa_efficient", _sdpa(SDPBackend.EFFICIENT_ATTENTION), True),
    ("eager", _eager, True),
]


def cuda_time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` on the GPU, each run bracketed by its own CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_seq(seq: int, tokens: int, warmup: int, iters: int) -> list[Row]:
    batch = max(32, math.ceil(tokens / seq))
    gen = torch.Generator(device="cuda").manual_seed(seq)

    def rand() -> torch.Tensor:
        shape = (batch, HEADS, seq, HEAD_DIM)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    q, k, v = rand(), rand(), rand()
    grad_out = torch.randn_like(q)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device="cuda", generator=gen)  # ragged captions
    mask = torch.arange(seq, device="cuda")[None, :] < lengths[:, None]
    fwd_flops = 4 * batch * HEADS * seq * seq * HEAD_DIM

    rows = []
    for name, fn, masked in METHODS:
        m = mask if masked else None

        def forward(fn: AttnFn = fn, m: torch.Tensor | None = m) -> None:
            with torch.no_grad():
                fn(q, k, v, m)

        def forward_backward(fn: AttnFn = fn, m: torch.Tensor | None = m) -> None:
            torch.autograd.grad(fn(q, k, v, m), (q, k, v), grad_out)

        try:
            fwd = cuda_time_ms(forward, warmup, iters)
            both = cuda_time_ms(forward_backward, warmup, iters)
        except RuntimeError as err:  # e.g. a backend that rejects these inputs
            print(f"  {name} (mask={masked}) N={seq}: skipped: {str(err).splitlines()[0]}")
            continue
        rows.append(Row(name, masked, seq, batch, fwd, fwd_flops / fwd / 1e9, both, 3.5 * fwd_flops / both / 1e9))
        print(f"  {name:<15} mask={masked!s:<5} N={seq:<4} fwd {fwd:8.3f} ms   fwd+bwd {both:8.3f} ms", flush=True)
    return rows


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Triton's speed relative to the fastest SDPA backend on the same job (> 1 means Triton is faster)."""
    out = []
    for seq in sorted({r.seq for r in rows}):
        for masked in (False, True):
            ours = [r for r in rows if r.seq == seq and r.masked == masked and r.method == "triton"]
            sdpa = [r for r in rows if r.seq == seq and r.masked == masked and r.method.startswith("sdpa")]
            if not ours or not sdpa:
                continue
            best_fwd = min(sdpa, key=lambda r: r.fwd_ms)
            best_both = min(sdpa, key=lambda r: r.fwd_bwd_ms)
            out.append({
                "seq": seq,
                "masked": masked,
                "fwd_speedup": best_fwd.fwd_ms / ours[0].fwd_ms,
                "fwd_vs": best_fwd.method,
                "fwd_bwd_speedup": best_both.fwd_bwd_ms / ours[0].fwd_bwd_ms,
                "fwd_bwd_vs": best_both.method,
            })  # fmt: skip
    return out


def print_tables(rows: list[Row], speedups: list[dict[str, Any]]) -> None:
    print(f"\nbf16, {HEADS} heads, head_dim {HEAD_DIM}; TFLOP/s with fwd = 4*B*H*N^2*D, fwd+bwd = 3.5x that")
    header = f"{'method':<15} {'mask':<5} {'N':>4} {'B':>5} {'fwd ms':>9} {'TFLOP/s':>8} {'f+b ms':>9} {'TFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.method:<15} {r.masked!s:<5} {r.seq:>4} {r.batch:>5} {r.fwd_ms:>9.3f} {r.fwd_tflops:>8.1f} "
            f"{r.fwd_bwd_ms:>9.3f} {r.fwd_bwd_tflops:>8.1f}"
        )
    print("\ntriton speed / best SDPA backend (> 1: triton faster)")
    for s in speedups:
        print(
            f"  N={s['seq']:<4} mask={s['masked']!s:<5} fwd {s['fwd_speedup']:.2f}x (vs {s['fwd_vs']})   "
            f"fwd+bwd {s['fwd_bwd_speedup']:.2f}x (vs {s['fwd_bwd_vs']})"
        )


def _model_batch(cfg: Any, batch: int, text_len: int) -> dict[str, torch.Tensor]:
    """A pretraining image-text batch with ragged captions (so the padding mask is exercised)."""
    from flava_ds.shard_format import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    patches = cfg.image.num_patches
    ids = torch.randint(5, cfg.text.vocab_size, (batch, text_len), generator=g)
    lengths = torch.randint(text_len // 3, text_len + 1, (batch,), generator=g)
    attention_mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    ids = ids * attention_mask
    masked = (torch.rand(batch, text_len, generator=g) < 0.15) & attention_mask.bool()
    masked[:, 1] = True
    inputs = {
        "input_ids": ids,
        "input_ids_masked": ids.masked_fill(masked, 103),
        "attention_mask": attention_mask,
        "mlm_labels": ids.masked_fill(~masked, IGNORE_INDEX),
        "pixel_values": torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g),
        "bool_masked_pos": torch.rand(batch, patches, generator=g) < 75 / 196,
        "mim_labels": torch.randint(0, cfg.image.codebook_vocab_size, (batch, patches), generator=g),
        "itm_labels": (torch.rand(batch, generator=g) > 0.1).long(),
    }
    return {key: value.cuda() for key, value in inputs.items()}


def bench_model(batch: int, text_len: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    """Time one bf16-autocast training step (forward, loss, backward) of FLAVA-full per attn_impl."""
    try:
        from flava_ds.model import FlavaConfig, FlavaForPreTraining
    except ImportError as err:
        print(f"\n--model skipped: flava_ds.model is not importable ({err})")
        return []
    results = []
    print(f"\nFLAVA-full training step, image-text batch {batch}, text length {text_len}, bf16 autocast")
    for impl in ("triton", "sdpa", "eager"):
        model = FlavaForPreTraining(FlavaConfig.preset("full", attn_impl=impl)).cuda().train()
        inputs = _model_batch(model.config, batch, text_len)

        def train_step(model: torch.nn.Module = model, inputs: dict[str, torch.Tensor] = inputs) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()

        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(train_step, warmup, iters)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        results.append({"attn_impl": impl, "batch": batch, "step_ms": ms, "peak_mem_gib": peak_gib})
        print(f"  attn_impl={impl:<7} step {ms:8.1f} ms   peak memory {peak_gib:6.1f} GiB", flush=True)
        del model, inputs, train_step
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=list(SEQ_LENS), help="sequence lengths")
    parser.add_argument("--tokens", type=int, default=96 * 1024, help="target batch*seq per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--model", action="store_true", help="also time a FLAVA-full training step per attn_impl")
    parser.add_argument("--model-batch", type=int, default=64)
    parser.add_argument("--model-text-len", type=int, default=77)
    parser.add_argument("--json", help="write all results to this JSON file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention: a CUDA GPU is required (the Triton kernels and SDPA GPU backends); nothing to do.")
        return 0
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    rows: list[Row] = []
    for seq in args.seq:
        print(f"N={seq}:", flush=True)
        rows += bench_seq(seq, args.tokens, args.warmup, args.iters)
    speedups = ratios(rows)
    print_tables(rows, speedups)
    model_rows = bench_model(args.model_batch, args.model_text_len, 3, 10) if args.model else []
    if args.json:
        with open(args.json, "w") as f:
            report = {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "heads": HEADS,
                "head_dim": HEAD_DIM,
                "dtype": "bfloat16",
                "kernels": [asdict(r) for r in rows],
                "triton_vs_best_sdpa": speedups,
                "model_step": model_rows,
            }
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

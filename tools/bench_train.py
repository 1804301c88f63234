#!/usr/bin/env python
"""End-to-end training throughput through the DeepSpeed engine, and the same batches through transformers' FLAVA.

  python tools/bench_train.py --preset small --batch 16 --threads 1          # CPU fp32, every kind + the mix
  python tools/bench_train.py --preset full --batch 256 --compare-batch 64 --zero 2 --gather --json t.json  # GPU, bf16

For each batch kind (image_text, image, text) and the mix of the three (`--mix`, default equal ratios, i.e.
round-robin in expectation), two phases run in this one process:

* train: `--steps` consecutive DeepSpeed steps (forward, backward, engine.step) fed by the real loader
  (`flava_ds.train.streams.TrainStreams`, `--workers` DataLoader workers) over Arrow/Megatron shards made with
  the real preprocess tools (`--data DIR`, else generated into a temporary directory: random images, a small
  WordPiece vocabulary, the tiny random dVAE codebook; the model's cost does not depend on the values).
  Reported: samples/s, model TFLOP/s (`flava_ds.train.flops.batch_flops`), MFU against `--peak-tflops` or
  the GPU's dense bf16 peak, peak memory (GPU: max allocated; CPU: process peak RSS), and the fraction of
  the step spent waiting for data.
* compare: `--compare-steps` batches from the same loader, each trained by our engine and then by
  `transformers.FlavaForPreTraining` with the same initial weights (bf16 autocast on GPU, fp32 on CPU; a
  plain torch AdamW step with the same clipping), alternating, so background load hits both alike. Reported:
  median step time of each (data wait excluded) and ours / transformers; on GPU also the memory one step
  allocates on top of what is resident, and its ratio. `--compare-batch` runs this phase at another batch.

Both phases first run one unmeasured step of every kind in the mix (loader workers start, first-call costs),
then `--warmup` unmeasured steps. Our engine is built as the trainer builds it (fused AdamW; no gradient
all-reduce on a single fp32 ZeRO-0 rank); `--compile` switches on FlavaConfig.compile for our model only;
`--threads 1` avoids OpenMP stalls on an oversubscribed CPU.

`--gather` also times the contrastive all-gather (forward + backward of the embeddings) over the
data-parallel group against the image-text step time. Single process: a 1-rank gloo (CPU) or NCCL (GPU) group.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flava_ds.batch import KINDS, Batch
from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.train.flops import batch_flops, peak_tflops
from flava_ds.train.metrics import peak_memory_mib
from tools.bench_setup import (
    build_engine,
    build_transformers,
    ds_config,
    existing_shards,
    init_process_group,
    make_shards,
    make_streams,
)

REPO = Path(__file__).resolve().parents[1]


# ---- timing -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def our_step(engine, batch: Batch) -> float:
    """The trainer's micro-step (`flava_ds.train.engine.backward_and_step`)."""
    from flava_ds.train.engine import backward_and_step

    out = engine(batch=batch)
    backward_and_step(engine, out.loss)
    return float(out.loss.detach())


def their_step(model, optimizer, batch: dict[str, torch.Tensor], clip: float, autocast) -> float:
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def schedule(streams, warmup: int, steps: int) -> list[tuple[str, bool]]:
    """(kind, measured) per step: first one unmeasured step of every kind in the mix (its loader workers start,
    first-call costs are paid), then `warmup` unmeasured and `steps` measured steps in the mixer's order."""
    kinds = [(kind, False) for kind in streams.mixer.kinds]
    return kinds + [(streams.kind(i), i >= warmup) for i in range(warmup + steps)]


def train_phase(
    engine, streams, cfg: FlavaConfig, device: torch.device, steps: int, warmup: int, peak: float | None
) -> dict[str, Any]:
    """Consecutive DeepSpeed steps fed by the loader: throughput, TFLOP/s, MFU, data wait, memory."""
    records = []
    reset_peak(device)
    for kind, measured in schedule(streams, warmup, steps):
        sync(device)
        start, wait_before = time.perf_counter(), streams.wait_seconds
        batch = streams.next_batch(kind).to(device, non_blocking=True)
        loss = our_step(engine, batch)
        sync(device)
        seconds = time.perf_counter() - start
        streams.advance(kind)
        if measured:
            mask = batch.attention_mask
            records.append(
                {
                    "kind": kind,
                    "seconds": seconds,
                    "wait": streams.wait_seconds - wait_before,
                    "flops": batch_flops(cfg, batch),
                    "samples": batch.size,
                    "text_slots": 0 if mask is None else mask.numel(),
                    "text_tokens": 0 if mask is None else int(mask.sum()),
                    "loss": loss,
                }
            )
    total = {key: sum(r[key] for r in records) for key in ("seconds", "wait", "flops", "samples", "text_slots")}
    tflops = total["flops"] / total["seconds"] / 1e12
    return {
        "steps": len(records),
        "kinds": {k: n for k in KINDS if (n := sum(r["kind"] == k for r in records))},
        "samples_per_s": total["samples"] / total["seconds"],
        "step_s_median": median([r["seconds"] for r in records]),
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "data_wait_fraction": total["wait"] / total["seconds"],
        # text positions that are padding (dynamic padding to the longest caption/window of each batch)
        "text_padding_fraction": 1 - sum(r["text_tokens"] for r in records) / total["text_slots"]
        if total["text_slots"]
        else None,
        "peak_mib": peak_memory_mib(),
        "last_loss": records[-1]["loss"] if records else None,
    }


def compare_phase(
    engine, theirs, streams, device: torch.device, steps: int, warmup: int, clip: float, autocast
) -> dict[str, Any]:
    """The same loader batches through both models, alternating; data wait is not part of either time.
    GPU memory: the most one step allocates on top of what was resident before it (both models stay loaded)."""
    model, optimizer = theirs
    times: dict[str, list[float]] = {"flava_ds": [], "transformers": []}
    memory: dict[str, float] = {"flava_ds": 0.0, "transformers": 0.0}
    losses: dict[str, float] = {}
    for step, (kind, measured) in enumerate(schedule(streams, warmup, steps)):
        batch = streams.next_batch(kind).to(device, non_blocking=True)
        streams.advance(kind)
        order = ("flava_ds", "transformers") if step % 2 == 0 else ("transformers", "flava_ds")
        for name in order:  # alternate who goes first
            sync(device)
            reset_peak(device)
            resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            start = time.perf_counter()
            try:
                if name == "flava_ds":
                    losses[name] = our_step(engine, batch)
                else:  # transformers edits mim_labels in place: it gets its own copy
                    batch_copy = {k: v.clone() for k, v in batch.items()}
                    losses[name] = their_step(model, optimizer, batch_copy, clip, autocast)
                sync(device)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return {"error": f"{name} ran out of memory at batch {batch.size}"}
            if measured:
                times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    memory[name] = max(memory[name], (torch.cuda.max_memory_allocated() - resident) / 2**20)
    med = {name: median(t) for name, t in times.items()}
    result: dict[str, Any] = {
        "steps": len(times["flava_ds"]),
        "flava_ds_step_s_median": med["flava_ds"],
        "transformers_step_s_median": med["transformers"],
        "flava_ds_runs": [round(t, 4) for t in times["flava_ds"]],
        "transformers_runs": [round(t, 4) for t in times["transformers"]],
        "time_ratio": med["flava_ds"] / med["transformers"],
        # over a mix of batch kinds the per-step median is one kind's time; the total is the meaningful ratio
        "total_time_ratio": sum(times["flava_ds"]) / sum(times["transformers"]),
        "last_loss": losses,
    }
    if device.type == "cuda":
        result.update(
            flava_ds_step_mib=memory["flava_ds"],
            transformers_step_mib=memory["transformers"],
            memory_ratio=memory["flava_ds"] / memory["transformers"],
        )
    return result


def gather_probe(engine, cfg: FlavaConfig, micro: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Time the contrastive loss's all-gather (image + text embeddings, forward + backward) over the DP group."""
    import torch.distributed as dist

    from flava_ds.model.contrastive import all_gather_rows
    from flava_ds.parallel.state import data_parallel_group

    dtype = next(engine.module.parameters()).dtype
    group = data_parallel_group()
    times = []
    for i in range(repeats + 2):
        image, text = (
            torch.randn(micro, cfg.projection_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2)
        )
        sync(device)
        start = time.perf_counter()
        gathered = all_gather_rows(image, group, True).sum() + all_gather_rows(text, group, True).sum()
        gathered.backward()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {
        "world_size": dist.get_world_size(group),
        "gather_fwd_bwd_s_median": median(times),
        "bytes_per_rank": 2 * micro * cfg.projection_dim * torch.finfo(dtype).bits // 8,
    }


# ---- main ---------------------------------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, float]:
    ratios = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"--mix: unknown kind {name!r}; kinds are {KINDS}")
        ratios[name] = float(value)
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="FlavaConfig preset (full, small, tiny, large)")
    parser.add_argument("--batch", type=int, default=8, help="micro batch (one process, no accumulation)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (ds_configs/zeroN.json)")
    parser.add_argument("--attn-impl", default="sdpa", choices=("sdpa", "eager", "triton"))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="FlavaConfig.compile: torch.compile our blocks")
    parser.add_argument("--kinds", default="image_text,image,text,mix", help="comma-separated; 'mix' = --mix ratios")
    parser.add_argument("--mix", type=parse_mix, default=dict.fromkeys(KINDS, 1.0), help="e.g. image_text=2,text=1")
    parser.add_argument("--steps", type=int, default=6, help="measured train-phase steps per kind")
    parser.add_argument("--compare-batch", type=int, help="batch of the comparison (default: --batch)")
    parser.add_argument("--compare-steps", type=int, default=4, help="measured steps per model and kind (0: skip)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before each phase")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per stream")
    parser.add_argument("--text-max-length", type=int, default=128, help="text-only window (captions: <= 77)")
    parser.add_argument("--data", type=Path, help="shards as make_shards lays them out (default: generate)")
    parser.add_argument("--pairs", type=int, default=256, help="generated image-text pairs (half also image-only)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping, both models")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: GPU lookup)")
    parser.add_argument("--gather", action="store_true", help="also time the contrastive all-gather")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    init_process_group(device)
    torch.manual_seed(0)
    cfg = FlavaConfig.preset(
        args.preset,
        attn_impl=args.attn_impl,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
    )
    peak = peak_tflops(args.peak_tflops)
    crop = cfg.image.image_size

    def autocast():  # transformers' mixed precision: fp32 weights, bf16/fp16 autocast on the GPU
        if precision == "fp32" or device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    text_length = min(args.text_max_length, cfg.text.max_position_embeddings)
    with tempfile.TemporaryDirectory() as tmp:
        shards = (
            existing_shards(args.data)
            if args.data
            else make_shards(Path(tmp), crop + 32, args.pairs, 64, workers=min(4, os.cpu_count() or 1))
        )
        model = FlavaForPreTraining(cfg)
        if args.compare_steps > 0:  # transformers starts from these weights; loaded only after the train phases
            model.save_hf_pretrained(Path(tmp) / "hf_init")
        engine = build_engine(model, ds_config(args.zero, precision, args.batch, args.clip), args.lr)
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "preset": args.preset,
            "batch": args.batch,
            "compare_batch": args.compare_batch or args.batch,
            "precision": precision,
            "zero": args.zero,
            "attn_impl": args.attn_impl,
            "compile": args.compile,
            "workers": args.workers,
            "peak_tflops": peak,
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "kinds": {kind: {"ratios": args.mix if kind == "mix" else {kind: 1.0}} for kind in kinds},
        }
        for kind, result in report["kinds"].items():  # our engine alone: its memory is not mixed with theirs
            streams = make_streams(shards, result["ratios"], crop, args.batch, args.workers, text_length)
            result["train"] = train_phase(engine, streams, cfg, device, args.steps, args.warmup, peak)
            print_train(kind, result["train"])
            save(report, args.json)
            del streams  # stops its loader workers
        if args.compare_steps > 0:
            theirs = build_transformers(Path(tmp) / "hf_init", device, args.lr)
            for kind, result in report["kinds"].items():
                compare_batch = args.compare_batch or args.batch
                streams = make_streams(shards, result["ratios"], crop, compare_batch, args.workers, text_length)
                result["compare"] = compare_phase(
                    engine, theirs, streams, device, args.compare_steps, args.warmup, args.clip, autocast
                )
                print_compare(kind, result["compare"])
                save(report, args.json)
                del streams
        if args.gather:
            probe = gather_probe(engine, cfg, args.batch, device, repeats=20)
            step = report["kinds"].get("image_text", {}).get("train", {}).get("step_s_median")
            probe["fraction_of_image_text_step"] = probe["gather_fwd_bwd_s_median"] / step if step else None
            report["gather"] = probe
            fraction = probe["fraction_of_image_text_step"] or float("nan")
            print(
                f"contrastive gather over {probe['world_size']} rank(s): {probe['gather_fwd_bwd_s_median'] * 1e3:.3f} "
                f"ms fwd+bwd = {100 * fraction:.3f}% of an image-text step"
            )
    save(report, args.json)
    return 0


def save(report: dict[str, Any], path: Path | None) -> None:
    """Rewritten after every phase, so a run cut short keeps what it measured."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def print_train(kind: str, t: dict[str, Any]) -> None:
    mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
    print(
        f"[{kind}] train: {t['samples_per_s']:.2f} samples/s, step {t['step_s_median']:.3f} s (median of "
        f"{t['steps']}), {t['tflops']:.4g} TFLOP/s, MFU {mfu}, data wait {100 * t['data_wait_fraction']:.2f}%, "
        f"peak {t['peak_mib']:.0f} MiB, text padding {100 * (t['text_padding_fraction'] or 0):.1f}%",
        flush=True,
    )


def print_compare(kind: str, c: dict[str, Any]) -> None:
    if "error" in c:
        print(f"[{kind}] compare: {c['error']}", flush=True)
        return
    mem = (
        f", step memory {c['flava_ds_step_mib']:.0f} vs {c['transformers_step_mib']:.0f} MiB ({c['memory_ratio']:.3f}x)"
        if "memory_ratio" in c
        else ""
    )
    print(
        f"[{kind}] compare: flava_ds {c['flava_ds_step_s_median']:.3f} s vs transformers "
        f"{c['transformers_step_s_median']:.3f} s median step -> ratio {c['time_ratio']:.3f}x (total time "
        f"{c['total_time_ratio']:.3f}x){mem} "
        f"(runs {c['flava_ds_runs']} vs {c['transformers_runs']})",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Forward+backward time and peak memory: flava_ds FlavaForPreTraining vs transformers, same weights and batch.

  python tools/bench_model.py                      # CPU fp32, `full` shapes, image-text batch of 4
  python tools/bench_model.py --preset small --batch 8 --kind image --repeats 5
  python tools/bench_model.py --accumulation 4     # the contrastive cache's cost: batch 4 as 4 micro-steps of 1

Both models run in this process, alternating, on identical weights (ours exported to a transformers
directory and loaded back) and identical inputs; the figure is the median over --repeats runs after a
warm-up. Peak memory on CPU is the resident-set growth of one step, each model in a fresh process; on CUDA it is
torch.cuda.max_memory_allocated. transformers' FLAVA runs its own eager attention.

With --accumulation A the contenders are flava_ds's ways of running one optimizer step over the same batch as the
trainer does (global-batch loss normalisers): one pass, A micro-steps with the contrastive cache (the default
under accumulation: the whole batch's contrastive loss and gradient), and A micro-steps without it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import transformers

from flava_ds.model import FlavaConfig, FlavaForPreTraining
from flava_ds.model.interop import config_to_hf
from flava_ds.shard_format import IGNORE_INDEX


def make_batch(cfg: FlavaConfig, kind: str, batch: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    """A realistic pretraining batch: 15% MLM, ~75/196 masked patches, 10% ITM negatives."""
    g = torch.Generator().manual_seed(0)
    P = cfg.image.num_patches
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    masked = torch.rand(batch, seq_len, generator=g) < 0.15
    masked[:, 1] = True
    image = {
        "pixel_values": torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g),
        "bool_masked_pos": torch.rand(batch, P, generator=g) < 75 / 196,
        "mim_labels": torch.randint(0, cfg.image.codebook_vocab_size, (batch, P), generator=g),
    }
    text = {
        "input_ids": ids,
        "input_ids_masked": ids.masked_fill(masked, 103),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        "mlm_labels": ids.masked_fill(~masked, IGNORE_INDEX),
    }
    itm = (torch.rand(batch, generator=g) > 0.1).long()
    chosen = {"image_text": {**image, **text, "itm_labels": itm}, "image": image, "text": text}[kind]
    return {k: v.to(device) for k, v in chosen.items()}


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss  # both models' outputs carry the weighted total as .loss
    loss.backward()
    return loss.item()


def accumulated_step(
    model: FlavaForPreTraining,
    batch: dict[str, torch.Tensor],
    accumulation: int,
    cached: bool,
    saved: list[int] | None = None,
) -> float:
    """One optimizer step over `batch` cut into `accumulation` micro-batches, as the trainer runs it: global-batch
    normalisers, micro-step losses / accumulation, and the contrastive cache when `cached`. With `saved`, each
    micro-step appends the bytes its forward saved for backward (activations: parameters and repeats excluded)."""
    model.zero_grad(set_to_none=True)
    micro = [{k: v.chunk(accumulation)[i] for k, v in batch.items()} for i in range(accumulation)]
    normalizers = model.loss_normalizers(micro)
    cache = model.contrastive_cache(micro) if cached else None
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0.0
    for m, inputs in enumerate(micro):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved is not None else nullcontext():
            out = model(**inputs, loss_normalizers=normalizers, contrastive_cache=cache.at(m) if cache else None)
        if saved is not None:
            saved.append(sum(storages.values()))
        (out.loss / accumulation).backward()
        total += out.loss.item() / accumulation
    return total


def timed(run: Callable[[], float], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_step_memory_mib(run: Callable[[], float], device: str) -> float:
    """Memory one training step adds on top of the weights (CPU: peak RSS growth of this process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_in_fresh_process(which: str, argv: list[str]) -> float:
    """CPU peak RSS is per process and never goes down, so each model is measured in its own process."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", which], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--kind", default="image_text", choices=["image_text", "image", "text"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn-impl", default="sdpa")
    parser.add_argument("--compile", action="store_true", help="FlavaConfig.compile: torch.compile our blocks")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--accumulation", type=int, default=1, help="compare flava_ds's ways to accumulate instead")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = FlavaConfig.preset(args.preset, attn_impl=args.attn_impl, compile=args.compile)
    batch = make_batch(cfg, args.kind, args.batch, args.seq_len, args.device)
    clone = lambda: {k: v.clone() for k, v in batch.items()}  # transformers edits mim_labels in place
    if args.accumulation > 1:
        accumulation_table(args, argv, cfg, batch)
        return
    if args.memory_of:  # only one model in this process, built directly: loading would raise the RSS peak
        if args.memory_of == "flava_ds":
            model = FlavaForPreTraining(cfg)
        else:
            model = transformers.FlavaForPreTraining(transformers.FlavaConfig(**config_to_hf(cfg, None)))
        model = model.to(args.device).train()
        if args.compile:  # compiling is not the step's memory
            step(model, clone())
        print(peak_step_memory_mib(lambda: step(model, clone()), args.device))
        return

    ours = FlavaForPreTraining(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_hf_pretrained(tmp)
        theirs = transformers.FlavaForPreTraining.from_pretrained(tmp)
    ours.to(args.device).train()
    theirs.to(args.device).train()

    loss_ours, loss_theirs = step(ours, batch), step(theirs, clone())  # warm-up, and a parity check
    times: dict[str, list[float]] = {"flava_ds": [], "transformers": []}
    for _ in range(args.repeats):
        times["flava_ds"].append(timed(lambda: step(ours, batch), args.device))
        times["transformers"].append(timed(lambda: step(theirs, clone()), args.device))
    if args.device == "cuda":
        mem = {
            "flava_ds": peak_step_memory_mib(lambda: step(ours, batch), args.device),
            "transformers": peak_step_memory_mib(lambda: step(theirs, clone()), args.device),
        }
    else:
        mem = {name: memory_in_fresh_process(name, argv) for name in times}

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"preset={args.preset} kind={args.kind} batch={args.batch} seq_len={args.seq_len} device={args.device} fp32 "
        f"attn_impl={args.attn_impl} compile={args.compile} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(f"loss  flava_ds={loss_ours:.6f}  transformers={loss_theirs:.6f}")
    print(f"{'model':<14}{'fwd+bwd median s':>18}{'all runs':>30}{'peak MiB':>12}")
    for name in times:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<14}{med[name]:>18.3f}{runs:>30}{mem[name]:>12.0f}")
    print(
        f"ratio flava_ds/transformers: time {med['flava_ds'] / med['transformers']:.3f}x, "
        f"peak memory {mem['flava_ds'] / mem['transformers']:.3f}x"
    )


def accumulation_table(args: argparse.Namespace, argv: list[str], cfg: FlavaConfig, batch: dict) -> None:
    """One pass vs --accumulation micro-steps with and without the contrastive cache, same batch and weights."""
    A = args.accumulation
    if args.batch % A:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --accumulation {A}")
    ways = {
        "one_pass": dict(accumulation=1, cached=False),
        "cache": dict(accumulation=A, cached=True),
        "no_cache": dict(accumulation=A, cached=False),
    }
    model = FlavaForPreTraining(cfg).to(args.device).train()
    runs = {name: partial(accumulated_step, model, batch, **way) for name, way in ways.items()}
    if args.memory_of:  # one way in this process
        print(peak_step_memory_mib(runs[args.memory_of], args.device))
        return
    losses = {name: run() for name, run in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so machine load hits every way alike
        for name, run in runs.items():
            times[name].append(timed(run, args.device))
    if args.device == "cuda":
        mem = {name: peak_step_memory_mib(run, args.device) for name, run in runs.items()}
    else:
        mem = {name: memory_in_fresh_process(name, argv) for name in runs}
    saved = {name: [] for name in ways}
    for name, way in ways.items():
        accumulated_step(model, batch, **way, saved=saved[name])
    activations = {name: max(sizes) / 2**20 for name, sizes in saved.items()}  # the largest micro-step's
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"preset={args.preset} kind={args.kind} batch={args.batch} accumulation={A} seq_len={args.seq_len} "
        f"device={args.device} fp32 threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(f"{'way':<10}{'loss':>12}{'step median s':>16}{'all runs':>30}{'peak MiB':>12}{'activations MiB':>18}")
    for name in runs:
        all_runs = " ".join(f"{t:.2f}" for t in times[name])
        row = f"{name:<10}{losses[name]:>12.6f}{med[name]:>16.3f}{all_runs:>30}{mem[name]:>12.0f}"
        print(f"{row}{activations[name]:>18.0f}")
    for name in ("cache", "no_cache"):
        print(
            f"ratio {name}/one_pass: time {med[name] / med['one_pass']:.3f}x, peak memory "
            f"{mem[name] / mem['one_pass']:.3f}x, saved activations {activations[name] / activations['one_pass']:.3f}x"
        )


if __name__ == "__main__":
    main()

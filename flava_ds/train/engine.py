"""The DeepSpeed engine around FLAVA, built and stepped one way for the trainer, the benchmarks and the tests.

`build_engine` makes the fused AdamW over decay / no-decay parameter groups, the warmup + cosine schedule and
`deepspeed.initialize`; `backward_and_step` is one micro-step's backward and `engine.step()` with the two
corrections DeepSpeed needs here (`fill_unreduced_gradients`, `clear_stale_zero3_gradients`). Anything that trains
through them trains exactly as `flava_ds.train.trainer.Trainer` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from flava_ds.parallel.state import data_parallel_size
from flava_ds.train.config import OptimizerSection, ScheduleSection


def training_device() -> torch.device:
    """The accelerator DeepSpeed picked for this rank (the CPU under its CPU accelerator)."""
    accelerator = deepspeed.get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator.device_name(), accelerator.current_device())


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if any(fragment in name for fragment in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    optimizer: OptimizerSection,
    schedule: ScheduleSection | None = None,
    total_steps: int = 1,
    mpu: Any = None,
):
    """`model` under DeepSpeed with fused AdamW (one kernel over all parameters, docs/BENCHMARKS.md §2) and, given
    `schedule`, warmup + cosine over `total_steps`; a single fp32 ZeRO-0 rank skips the empty all-reduce."""
    adamw = torch.optim.AdamW(
        param_groups(model, optimizer.weight_decay, optimizer.no_decay),
        lr=optimizer.lr,
        betas=tuple(optimizer.betas),
        eps=optimizer.eps,
        fused=True,
    )
    scheduler = None
    if schedule is not None:
        factor = warmup_cosine(schedule.warmup_steps, total_steps, schedule.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=adamw, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    skip_single_rank_allreduce(engine, data_parallel_size())
    return engine


def backward_and_step(engine, loss: torch.Tensor) -> None:
    """One micro-step: backward, then `engine.step()` (an update at the accumulation boundary)."""
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    fill_unreduced_gradients(engine)
    engine.step()
    if boundary:
        clear_stale_zero3_gradients(engine)


def skip_single_rank_allreduce(engine, dp_size: int) -> bool:
    """ZeRO-0 in fp32 with one data-parallel rank: nothing to all-reduce, yet DeepSpeed flattens every gradient into
    a buffer, "reduces" it over the 1-rank group and copies it back (a quarter of a FLAVA-full text step on one CPU
    thread, docs/BENCHMARKS.md §2.3). Turn that off; `fill_unreduced_gradients` then gives the update the
    reduction gives. Mixed precision and ZeRO-1/2/3 keep DeepSpeed's own gradient path."""
    if dp_size > 1 or engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return False
    engine.enable_backward_allreduce = False
    return True


def fill_unreduced_gradients(engine) -> None:
    """Before `engine.step()`: where `skip_single_rank_allreduce` turned the reduction off, give parameters the
    step did not use (the text tower on an image step) the zero gradient the reduction gives them, so AdamW decays
    and moves them exactly as on many ranks and under ZeRO-1/2/3. A no-op everywhere else."""
    if engine.enable_backward_allreduce or not engine.is_gradient_accumulation_boundary():
        return
    for param in engine.module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def clear_stale_zero3_gradients(engine) -> None:
    """After an update: ZeRO-3 keeps each parameter's reduced gradient partition until that parameter gets a new
    one, so a parameter unused in a step (the image encoder on a text-only step) would re-apply an old gradient
    and count it in the clipping norm. Zeroing the partitions gives unused parameters a zero gradient, as
    ZeRO-0/1/2 do."""
    if engine.zero_optimization_stage() != 3:
        return
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()


def engine_scalars(engine) -> dict[str, float]:
    """What the engine knows of the last update: lr, logit scale, grad norm (where DeepSpeed computes it: not
    ZeRO-0), fp16 loss scale. Collective under ZeRO-3 (the logit scale is gathered)."""
    param = engine.module.logit_scale
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([param]):
            logit_scale = float(param.detach())
    else:
        logit_scale = float(param.detach())
    scalars = {"lr": engine.get_lr()[0], "logit_scale": logit_scale}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    if engine.fp16_enabled():
        scalars["loss_scale"] = float(engine.optimizer.cur_scale)
    return scalars


def release_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (69 MB per rank) and never unlinks it, so every CPU run, and every killed one, leaks that much RAM. Once all ranks
    are past initialisation (the barrier) every buffer is mapped; unlinking the name keeps the mappings and lets the
    kernel free the memory when the last process exits, however it exits."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    dist.barrier()
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)

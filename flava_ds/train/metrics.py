"""What a run reports: per-interval statistics, and on global rank 0 TensorBoard / W&B, the metrics file, the console.

* `IntervalStats` sums one log interval (loss terms per batch kind, FLOPs, tokens, time, data wait) and turns it
  into scalars averaged over the data-parallel ranks (collective).
* `ScalarSinks`: TensorBoard, and Weights & Biases when `logging.wandb.project` is set (`wandb` is optional; its
  offline mode needs no network: `wandb sync` uploads later).
* `MetricsFile`: JSON lines a strict parser reads, holding one trajectory however often the run resumed:
  non-finite numbers are written as `null` (bare `NaN` is not JSON), and a run resumed from step S first drops
  the records after S (the killed run's steps past its last checkpoint are retrained).
* `RunLog` sends each record where it belongs and prints the console line with elapsed time and ETA.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flava_ds.batch import Batch
from flava_ds.model import LOSS_NAMES, FlavaConfig, FlavaOutput
from flava_ds.shard_format import atomic_write_bytes
from flava_ds.train.config import LoggingSection, RunConfig
from flava_ds.train.flops import batch_flops, batch_tokens

log = logging.getLogger("flava_ds.train")


class IntervalStats:
    """Sums over one log interval: loss terms per batch kind, FLOPs, tokens, time."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.flops = 0.0
        self.tokens = 0
        self.seconds = self.wait = 0.0
        self.micro_steps = 0

    def add(self, out: FlavaOutput, batch: Batch, model_config: FlavaConfig) -> None:
        self.micro_steps += 1
        self.flops += batch_flops(model_config, batch)
        self.tokens += batch_tokens(batch)
        for name in (*LOSS_NAMES, "total"):
            value = out.loss if name == "total" else out.losses.get(name)
            if value is not None:
                self.sums[f"loss/{batch.kind}/{name}"] += float(value.detach())
                self.counts[f"loss/{batch.kind}/{name}"] += 1
        self.sums["loss/total"] += float(out.loss.detach())
        self.counts["loss/total"] += 1

    def scalars(self, group, dp_size: int, micro: int, tensor_parallel: int, peak: float | None) -> dict[str, float]:
        """Loss terms (means over the interval and the data-parallel ranks, which all saw the same kinds: a
        collective), throughput, TFLOP/s and MFU per device, data wait, peak memory."""
        names = sorted(self.sums)
        scalars: dict[str, float] = {}
        if names:
            sums = torch.tensor([self.sums[n] for n in names], dtype=torch.float64)
            dist.all_reduce(sums, group=group)
            scalars = {n: float(s) / dp_size / self.counts[n] for n, s in zip(names, sums.tolist())}
        seconds = max(self.seconds, 1e-9)
        tflops = self.flops / seconds / 1e12 / tensor_parallel
        scalars.update(
            {
                "throughput/samples_per_s": self.micro_steps * micro * dp_size / seconds,
                "throughput/tokens_per_s": self.tokens * dp_size / seconds,
                "throughput/tflops_per_device": tflops,
                "throughput/data_wait_fraction": self.wait / seconds,
                "memory/peak_mib": peak_memory_mib(),
            }
        )
        if peak:
            scalars["throughput/mfu"] = tflops / peak
        return scalars


class ScalarSinks:
    def __init__(self, logging: LoggingSection, run_config: dict[str, Any]):
        self.tensorboard = self.wandb = None
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(logging.tensorboard_dir)
        if logging.wandb.project:
            import wandb  # checked at start-up (train.config.validate)

            w = logging.wandb
            self.wandb = wandb.init(project=w.project, name=w.name, mode=w.mode, dir=w.dir, config=run_config)

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON `null`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop every record after `step` (and a torn last line of a killed run), atomically."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())


class RunLog:
    """Rank 0 writes; on other ranks every call does nothing (they still take part in the collectives before)."""

    def __init__(self, config: RunConfig, rank: int, first_step: int):
        self.writes = rank == 0
        self.total_steps = config.train.steps
        self.sinks = ScalarSinks(config.logging, config.to_dict()) if self.writes else None
        path = config.logging.metrics_file
        self.metrics = MetricsFile(path) if path and self.writes else None
        if self.metrics is not None:
            self.metrics.keep_until(first_step)  # one trajectory: a killed run's steps past this checkpoint go
        self.started, self.first_step = time.perf_counter(), first_step

    def step(self, step: int, loss: float) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, "loss": loss})

    def interval(self, step: int, scalars: dict[str, float]) -> None:
        if not self.writes:
            return
        self.sinks.add(scalars, step)
        if self.metrics is not None:
            self.metrics.write({"step": step, "log": scalars})
        log.info(console_line(step, self.total_steps, scalars, time.perf_counter() - self.started, self.first_step))

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.writes:
            return
        self.sinks.add({f"eval/{name}": value for name, value in metrics.items()}, step)
        if self.metrics is not None:
            self.metrics.write({"step": step, "eval": metrics})
        log.info("eval step %d | %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def console_line(step: int, total: int, scalars: dict[str, float], elapsed: float, first_step: int) -> str:
    terms = " ".join(f"{k.removeprefix('loss/')}={v:.3f}" for k, v in sorted(scalars.items()) if k.startswith("loss/"))
    eta = elapsed / max(step - first_step, 1) * (total - step)
    epochs = " ".join(f"{k.removeprefix('data/epoch/')} {v:.2f}" for k, v in scalars.items() if "/epoch/" in k)
    return (
        f"step {step}/{total} | {terms} | lr {scalars['lr']:.2e} | gnorm {scalars.get('grad_norm', math.nan):.2f} | "
        f"{scalars['throughput/samples_per_s']:.1f} samples/s | {scalars['throughput/tflops_per_device']:.3f} "
        f"TFLOP/s | data {100 * scalars['throughput/data_wait_fraction']:.1f}% | {scalars['memory/peak_mib']:.0f} "
        f"MiB | elapsed {duration(elapsed)} | ETA {duration(eta)} | {scalars['data/samples_seen']:.0f} samples | "
        f"epoch {epochs}"
    )


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

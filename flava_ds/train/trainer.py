"""The training loop: DeepSpeed engine, mixed batch kinds, exact resume, non-finite guard, TensorBoard.

One optimizer step = `gradient_accumulation_steps` micro-steps, all of one batch kind: step s trains task
`streams.task(s)` on every rank and micro-step (the paper's "in each training iteration one dataset is chosen"),
so accumulation does not change which kinds a step mixes. Every loss term of a step is a mean over the targets of
the whole global batch (all data-parallel ranks x all micro-steps; `Trainer._loss_normalizers`), so the loss and
the update do not depend on how the global batch is cut over ranks and micro-steps; under accumulation the
contrastive term scores against the columns of all micro-batches of the step (`ContrastiveCache`, computed
before the micro-steps without gradient; `train.contrastive_cache`). Per-step losses, the means over micro-steps and
ranks of the micro-steps' losses, are then the global batch's losses; they go to the metrics file, and every log
interval TensorBoard gets each loss term per batch kind, lr, grad norm, logit scale, loss scale, throughput,
TFLOP/s, MFU, data wait, memory, skipped updates and bad samples. What survives kills, signals, bad data and
non-finite steps: docs/RELIABILITY.md.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from flava_ds.data.tokenizer import Tokenizer
from flava_ds.data.tolerant import BAD_SAMPLES
from flava_ds.model import LOSS_NAMES, FlavaConfig, FlavaForPreTraining
from flava_ds.model.contrastive import ContrastiveCache
from flava_ds.parallel.state import (
    DeepSpeedMPU,
    data_parallel_group,
    data_parallel_rank,
    data_parallel_size,
    initialize_parallel,
    set_seed,
)
from flava_ds.train import checkpoint
from flava_ds.train.config import RunConfig, model_config_of
from flava_ds.train.elastic import TOPOLOGY, Topology
from flava_ds.train.faults import FAULTS, log_samples
from flava_ds.train.flops import batch_flops, batch_tokens, peak_tflops
from flava_ds.train.metrics_file import MetricsFile
from flava_ds.train.scalar_sinks import ScalarSinks
from flava_ds.train.sidecars import data_sources, run_sidecars
from flava_ds.train.signals import LauncherWatch, StopSignal
from flava_ds.train.streams import TrainStreams
from flava_ds.train.warm_start import initialize_from_checkpoints

log = logging.getLogger("flava_ds.train")
COMPLETE_MARKER = "flava_ds: training complete"
STOPPED_MARKER = "flava_ds: stopped early with a checkpoint (resume with --load)"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class BadSampleError(RuntimeError):
    """More samples failed to decode than data.max_bad_sample_fraction allows."""


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if any(fragment in name for fragment in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def skip_single_rank_allreduce(engine, dp_size: int) -> bool:
    """ZeRO-0 in fp32 with one data-parallel rank: nothing to all-reduce, yet DeepSpeed flattens every gradient into
    a buffer, "reduces" it over the 1-rank group and copies it back (a quarter of a FLAVA-full text step on one CPU
    thread, docs/BENCHMARKS.md §2.3). Turn that off; the caller then runs `fill_unreduced_gradients` before each
    `engine.step()`, so the update is the one the reduction gives. Mixed precision and ZeRO-1/2/3 keep DeepSpeed's
    own gradient path."""
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


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def release_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (69 MB per rank) and never unlinks it, so every CPU run, and every killed one, leaks that much RAM. Once all ranks
    are past initialisation (the barrier) every buffer is mapped; unlinking the name keeps the mappings and lets the
    kernel free the memory when the last process exits, however it exits."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    dist.barrier()
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


class Trainer:
    def __init__(self, config: RunConfig, ds_config: dict[str, Any], micro: int, accum: int):
        self.config = config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        release_shm_allreduce_buffer(self.rank)
        tp = config.train.tensor_parallel_size
        mpu = None
        if tp > 1:  # megatron-core groups; TP peers share a batch, ZeRO and the contrastive gather span DP ranks
            initialize_parallel(tp)
            mpu = DeepSpeedMPU()
        self.dp_size, self.dp_rank = data_parallel_size(), data_parallel_rank()
        self.micro, self.accum = micro, accum
        accelerator = deepspeed.get_accelerator()
        on_cpu = accelerator.device_name() == "cpu"
        self.device = (
            torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(), accelerator.current_device())
        )

        self.model_config = model_config_of(config)
        tokenizer = Tokenizer.from_file(config.data.tokenizer) if config.data.tokenizer else None
        self.tokenizer = tokenizer
        self.streams = TrainStreams(
            config.data, tokenizer, self.model_config.image.image_size, micro, self.dp_rank, self.dp_size, accum
        )  # opens and checks every shard before the model
        self.data_sources = data_sources(config.data)  # read once: checkpoints record them

        set_seed(config.train.seed)  # every rank builds the same full weights (TP ranks keep their slices)
        model = FlavaForPreTraining(self.model_config)
        initialize_from_checkpoints(model, config.model.init)
        opt = config.optimizer
        optimizer = torch.optim.AdamW(  # fused: one kernel over all parameters (docs/BENCHMARKS.md §2)
            param_groups(model, opt.weight_decay, opt.no_decay),
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            fused=True,
        )
        schedule = config.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(schedule.warmup_steps, config.train.steps, schedule.min_lr_ratio)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
        )
        self.zero_stage = self.engine.zero_optimization_stage()
        self.topology = Topology(self.dp_size, tp, micro, accum, self.zero_stage)
        skip_single_rank_allreduce(self.engine, self.dp_size)
        self.fp16 = self.engine.fp16_enabled()
        # DeepSpeed skips a non-finite update itself with ZeRO-1/2 (any precision) and fp16 (any stage)
        self.can_skip_nonfinite = self.zero_stage in (1, 2) or self.fp16

        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.bad_samples = 0  # over all data-parallel ranks, since step 0
        self._bad_local = 0  # this rank, since the last reduction
        if config.checkpoint.load:
            self._resume(config.checkpoint.load)

        self.sinks = ScalarSinks(config.logging, config.to_dict()) if self.rank == 0 else None
        self._started = (time.perf_counter(), self.step)  # for the console's elapsed time and ETA
        self.metrics = MetricsFile(config.logging.metrics_file) if config.logging.metrics_file else None
        if self.metrics is not None and self.rank == 0:
            self.metrics.keep_until(self.step)  # one trajectory: a killed run's steps past this checkpoint go
        self.peak = peak_tflops(config.logging.peak_tflops)
        self.stop = StopSignal(config.train.stop_deadline_s)
        self.launcher_watch = LauncherWatch(self.stop.request)
        self.stopped_early = False

    # ---- checkpoints ------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": self.streams.state_dict(),
            "rng": checkpoint.rng_state(),
            "skipped_steps": self.skipped_steps,
            "bad_samples": self.bad_samples,
            "run_config": self.config.to_dict(),
            "flava_config": self.model_config.to_dict(),
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }

    def save(self) -> None:
        record, files = run_sidecars(self.tokenizer, self.model_config.image.image_size, self.step, self.data_sources)
        sidecars = {
            checkpoint.MODEL_CONFIG: self.model_config.to_dict(),
            checkpoint.RUN_CONFIG: self.config.to_dict(),  # what tools/evaluate.py --run-config reads
            TOPOLOGY: asdict(self.topology),
            **record,
        }
        path = checkpoint.save(
            self.engine,
            self.config.checkpoint.save,
            self.step,
            self.client_state(),
            self.config.checkpoint.keep_last,
            sidecars,
            files,
        )
        log.info("saved checkpoint %s", path)

    def _resume(self, load_dir: str) -> None:
        state = checkpoint.load(self.engine, load_dir, self.config.checkpoint.trusted_globals)
        if state is None:
            log.info("nothing to resume in %s: starting from step 0", load_dir)
            return
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
        self.streams.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", load_dir, self.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config.train
        window = _Window()
        while self.step < cfg.steps:
            step_loss = self._train_step(window)
            self.step += 1
            # one reduction: any rank asked to stop (signal, exit_at_step), and this step's bad samples
            flags = torch.tensor([float(self.stop.requested or self.step == cfg.exit_at_step), self._bad_local])
            dist.all_reduce(flags)
            self._bad_local = 0
            self._count_bad_samples(int(flags[1].item()) // self.config.train.tensor_parallel_size)
            stop = bool(flags[0].item())
            self._write_metrics({"step": self.step, "loss": step_loss})
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                self._log(window)
                window = _Window()
            if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                self.evaluate()
            if self.config.checkpoint.save and (
                (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == cfg.steps or stop
            ):
                self.save()
            if stop:
                log.warning("stopped at step %d (signal or train.exit_at_step) after saving", self.step)
                self.stopped_early = True
                return
        self.evaluate()

    def close(self) -> None:
        """End the loader workers and flush the scalar sinks (also on a fatal error: nothing here waits on peers)."""
        self.streams.close()
        if self.sinks is not None:
            self.sinks.close()

    def _count_bad_samples(self, new: int) -> None:
        """Stop once bad samples exceed data.max_bad_sample_fraction of those read (after 1/fraction reads)."""
        self.bad_samples += new
        if not self.bad_samples:
            return
        fraction = self.config.data.max_bad_sample_fraction
        read = self.step * self.accum * self.micro * self.dp_size
        if self.bad_samples > fraction * read and (fraction == 0 or read * fraction >= 1):
            raise BadSampleError(
                f"{self.bad_samples} of {read} samples failed to decode by step {self.step} (more than "
                f"data.max_bad_sample_fraction={fraction}); stopping with the last checkpoint intact. The first "
                "failures are named in the log; check the shards with data.verify_checksums: true."
            )

    def _train_step(self, window: _Window) -> float:
        if FAULTS.error_at == (self.rank, self.step + 1):
            raise IndexError(f"injected fault on rank {self.rank} at step {self.step + 1} (FLAVA_DS_INJECT_ERROR)")
        step_start, wait_start = time.perf_counter(), self.streams.wait_seconds
        losses, nonfinite = [], False
        task = self.streams.task(self.step)
        batches = [self.streams.next_batch(task) for _ in range(self.accum)]  # small; their activations are not
        self._bad_local += sum(int(batch.pop(BAD_SAMPLES)) for batch in batches)
        normalizers = self.engine.module.loss_normalizers(batches, across_ranks=True)  # counted on the host
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in batch.items()} for batch in batches]
        cache = self._contrastive_cache(batches)
        for micro, batch in enumerate(batches):
            out = self.engine(
                **batch, loss_normalizers=normalizers, contrastive_cache=cache.at(micro) if cache else None
            )
            if FAULTS.nan_steps and self.step + 1 in FAULTS.nan_steps:
                out.loss = out.loss * float("nan")
            finite = torch.tensor([float(torch.isfinite(out.loss).item())])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank takes the same decision
            if finite.item() == 0:
                nonfinite = True
                if not self.can_skip_nonfinite:
                    raise NonFiniteError(
                        f"non-finite loss at step {self.step + 1} ({task} batch) with ZeRO stage {self.zero_stage} "
                        "in fp32/bf16, where DeepSpeed cannot skip the update; stopping with the last checkpoint "
                        "intact. Use ZeRO-1/2 or fp16 to skip such steps instead."
                    )
            self.engine.backward(out.loss)
            fill_unreduced_gradients(self.engine)
            self.engine.step()
            if micro == self.accum - 1:
                self._clear_stale_zero3_gradients()
            if FAULTS.sample_log:
                log_samples(self.rank, self.step + 1, micro, task, self.streams.current_keys(task))
            self.streams.advance(task)
            losses.append(out.loss.detach().float())
            window.add(task, out, batch, self.model_config)
        if not self.engine.was_step_applied() and (nonfinite or not self.fp16):
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
            log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                self.step + 1,
                self.nonfinite_in_row,
            )
            if self.nonfinite_in_row >= self.config.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} consecutive steps with a non-finite loss or gradient (last: step "
                    f"{self.step + 1}); stopping with the last good checkpoint intact. Lower the lr or check the data."
                )
        else:
            self.nonfinite_in_row = 0
        window.seconds += time.perf_counter() - step_start
        window.wait += self.streams.wait_seconds - wait_start
        window.steps += 1
        loss = torch.stack(losses).mean().reshape(1)
        dist.all_reduce(loss, group=data_parallel_group())
        return loss.item() / self.dp_size

    def _contrastive_cache(self, batches: list[dict[str, torch.Tensor]]) -> ContrastiveCache | None:
        """Under accumulation, an image-text step's contrastive embeddings of every micro-batch on every rank
        (one forward of the unmasked views per micro-batch, without gradient), so each micro-step scores against
        the whole global batch; None where a micro-batch already sees all of it or nothing is contrastive."""
        if self.accum == 1 or not self.config.train.contrastive_cache:
            return None
        return self.engine.module.contrastive_cache(batches)

    def _clear_stale_zero3_gradients(self) -> None:
        """ZeRO-3 keeps each parameter's reduced gradient partition until that parameter gets a new one, so a
        parameter unused in a step (the image encoder on a text-only step) would re-apply an old gradient and
        count it in the clipping norm. Zeroing the partitions after each update gives unused parameters a zero
        gradient, as ZeRO-0/1/2 do."""
        buffer = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None) if self.zero_stage == 3 else None
        if buffer is not None:
            buffer.zero_()

    # ---- logging ----------------------------------------------------------------------------------
    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self.metrics is not None:
            self.metrics.write(record)

    def _scalar_logit_scale(self) -> float:
        param = self.engine.module.logit_scale
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([param]):
                return float(param.detach())
        return float(param.detach())

    def _log(self, window: _Window) -> None:
        terms = window.reduced_terms(data_parallel_group(), self.dp_size)
        scalars: dict[str, float] = dict(terms)
        samples = window.micro_steps * self.micro * self.dp_size
        tp = self.config.train.tensor_parallel_size
        tflops = window.flops / max(window.seconds, 1e-9) / 1e12 / tp  # per device
        scalars.update(
            {
                "lr": self.engine.get_lr()[0],
                "logit_scale": self._scalar_logit_scale(),
                "throughput/samples_per_s": samples / max(window.seconds, 1e-9),
                "throughput/tokens_per_s": window.tokens * self.dp_size / max(window.seconds, 1e-9),
                "throughput/tflops_per_device": tflops,
                "throughput/data_wait_fraction": window.wait / max(window.seconds, 1e-9),
                "memory/peak_mib": _peak_memory_mib(),
                "skipped_steps": float(self.skipped_steps),
                "data/bad_samples": float(self.bad_samples),
                "data/samples_seen": float(self.step * self.micro * self.dp_size * self.accum),
                **{f"data/epoch/{task}": epoch for task, epoch in self.streams.epochs().items()},
            }
        )
        grad_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (ZeRO-0)
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.peak:
            scalars["throughput/mfu"] = tflops / self.peak
        if self.fp16:
            scalars["loss_scale"] = float(self.engine.optimizer.cur_scale)
        if self.rank == 0:
            self.sinks.add(scalars, self.step)
            self._write_metrics({"step": self.step, "log": scalars})
            loss_terms = " ".join(f"{k.removeprefix('loss/')}={v:.3f}" for k, v in sorted(terms.items()))
            start, first_step = self._started
            elapsed = time.perf_counter() - start
            eta = elapsed / max(self.step - first_step, 1) * (self.config.train.steps - self.step)
            epochs = " ".join(f"{task} {epoch:.2f}" for task, epoch in self.streams.epochs().items())
            log.info(
                "step %d/%d | %s | lr %.2e | gnorm %.2f | %.1f samples/s | %.3f TFLOP/s | data %.1f%% | %.0f MiB | "
                "elapsed %s | ETA %s | %d samples | epoch %s",
                self.step,
                self.config.train.steps,
                loss_terms,
                scalars["lr"],
                scalars.get("grad_norm", math.nan),
                scalars["throughput/samples_per_s"],
                tflops,
                100 * scalars["throughput/data_wait_fraction"],
                scalars["memory/peak_mib"],
                _duration(elapsed),
                _duration(eta),
                scalars["data/samples_seen"],
                epochs,
            )

    def evaluate(self) -> None:
        if not (self.config.eval.image_text or self.config.eval.classification or self.config.eval.text):
            return
        from flava_ds.train.evaluate import evaluate

        metrics = evaluate(self.engine.module, self.config, self.tokenizer, self.device)
        if self.rank == 0:
            self.sinks.add({f"eval/{name}": value for name, value in metrics.items()}, self.step)
            self._write_metrics({"step": self.step, "eval": metrics})
            log.info("eval step %d | %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


class _Window:
    """Sums over one log interval: loss terms per batch kind, FLOPs, tokens, time."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.flops = 0.0
        self.tokens = 0
        self.seconds = self.wait = 0.0
        self.steps = self.micro_steps = 0

    def add(self, task: str, out, batch: dict[str, torch.Tensor], model_config: FlavaConfig) -> None:
        self.micro_steps += 1
        self.flops += batch_flops(model_config, task, batch)
        self.tokens += batch_tokens(batch)
        for name in (*LOSS_NAMES, "total"):
            value = out.loss if name == "total" else out.losses.get(name)
            if value is not None:
                self.sums[f"loss/{task}/{name}"] += float(value.detach())
                self.counts[f"loss/{task}/{name}"] += 1
        self.sums["loss/total"] += float(out.loss.detach())
        self.counts["loss/total"] += 1

    def reduced_terms(self, group, dp_size: int) -> dict[str, float]:
        """Means over the window, averaged over data-parallel ranks (all ranks saw the same tasks)."""
        names = sorted(self.sums)
        if not names:
            return {}
        sums = torch.tensor([self.sums[n] for n in names], dtype=torch.float64)
        dist.all_reduce(sums, group=group)
        return {n: float(s) / dp_size / self.counts[n] for n, s in zip(names, sums.tolist())}


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

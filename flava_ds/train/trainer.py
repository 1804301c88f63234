"""The training loop: mixed batch kinds, exact resume, the guards, checkpoints and logging every interval.

One optimizer step = `gradient_accumulation_steps` micro-steps, all of one batch kind: step s trains kind
`streams.kind(s)` on every rank and micro-step (the paper's "in each training iteration one dataset is chosen").
Every loss term of a step is a mean over the targets of the whole global batch (all data-parallel ranks x all
micro-steps; `FlavaForPreTraining.loss_normalizers`), so the loss and the update do not depend on how the global
batch is cut over ranks and micro-steps; under accumulation the contrastive term scores against the columns of all
micro-batches of the step (`ContrastiveCache`; `train.contrastive_cache`). The engine is built and stepped by
`flava_ds.train.engine`, the scalars written by `flava_ds.train.metrics`, stop requests come from
`flava_ds.train.signals`. What survives kills, signals, bad data and non-finite steps: docs/RELIABILITY.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model import FlavaForPreTraining
from flava_ds.parallel.state import (
    DeepSpeedMPU,
    data_parallel_group,
    data_parallel_size,
    initialize_parallel,
    set_seed,
)
from flava_ds.train import checkpoint
from flava_ds.train.config import RunConfig, model_config_of
from flava_ds.train.elastic import TOPOLOGY, Topology
from flava_ds.train.engine import (
    backward_and_step,
    build_engine,
    engine_scalars,
    release_shm_allreduce_buffer,
    training_device,
)
from flava_ds.train.faults import FAULTS, log_samples
from flava_ds.train.flops import peak_tflops
from flava_ds.train.guards import StepGuards
from flava_ds.train.metrics import IntervalStats, RunLog
from flava_ds.train.sidecars import data_sources, run_sidecars
from flava_ds.train.signals import LauncherWatch, StopSignal
from flava_ds.train.streams import TrainStreams
from flava_ds.train.warm_start import initialize_from_checkpoints

log = logging.getLogger("flava_ds.train")
COMPLETE_MARKER = "flava_ds: training complete"
STOPPED_MARKER = "flava_ds: stopped early with a checkpoint (resume with --load)"


class Trainer:
    def __init__(self, config: RunConfig, ds_config: dict[str, Any], micro: int, accum: int):
        self.config, self.micro, self.accum = config, micro, accum
        self.rank = dist.get_rank()
        release_shm_allreduce_buffer(self.rank)
        tp = config.train.tensor_parallel_size
        if tp > 1:  # megatron-core groups; TP peers share a batch, ZeRO and the contrastive gather span DP ranks
            initialize_parallel(tp)
        self.dp_size = data_parallel_size()
        self.device = training_device()
        self.model_config = model_config_of(config)
        self.tokenizer = Tokenizer.from_file(config.data.tokenizer) if config.data.tokenizer else None
        self.streams = TrainStreams(  # opens and checks every shard before the model
            config.data, self.tokenizer, self.model_config.image.image_size, micro, accum
        )
        self.data_sources = data_sources(config.data)  # read once: checkpoints record them

        set_seed(config.train.seed)  # every rank builds the same full weights (TP ranks keep their slices)
        model = FlavaForPreTraining(self.model_config)
        initialize_from_checkpoints(model, config.model.init)
        mpu = DeepSpeedMPU() if tp > 1 else None
        self.engine = build_engine(model, ds_config, config.optimizer, config.schedule, config.train.steps, mpu)
        self.topology = Topology(self.dp_size, tp, micro, accum, self.engine.zero_optimization_stage())
        self.guards = StepGuards(config, self.engine.zero_optimization_stage(), self.engine.fp16_enabled())
        self.step = 0
        if config.checkpoint.load:
            self._resume(config.checkpoint.load)
        self.log = RunLog(config, self.rank, self.step)
        self.peak = peak_tflops(config.logging.peak_tflops)
        self.stop = StopSignal(config.train.stop_deadline_s)
        self.launcher_watch = LauncherWatch(self.stop.request)
        self.stopped_early = False

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config.train
        stats = IntervalStats()
        while self.step < cfg.steps:
            loss = self.train_step(stats)
            self.step += 1
            asked = self.stop.requested or self.step == cfg.exit_at_step
            stop = self.guards.stop_requested(asked, self.step, self._samples_seen())
            self.log.step(self.step, loss)
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                self.log.interval(self.step, self._interval_scalars(stats))
                stats = IntervalStats()
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

    def train_step(self, stats: IntervalStats) -> float:
        """One optimizer step over `accum` micro-batches of one kind; returns the global batch's loss."""
        self._inject_error()
        step_start, wait_start = time.perf_counter(), self.streams.wait_seconds
        kind = self.streams.kind(self.step)
        batches = [self.streams.next_batch(kind) for _ in range(self.accum)]  # small; their activations are not
        self.guards.bad_local += sum(batch.bad_samples for batch in batches)
        normalizers = self.engine.module.loss_normalizers(batches, across_ranks=True)  # counted on the host
        batches = [batch.to(self.device, non_blocking=True) for batch in batches]
        cache = None  # under accumulation: every micro-batch's contrastive embeddings, gathered without gradient
        if self.accum > 1 and self.config.train.contrastive_cache:
            cache = self.engine.module.contrastive_cache(batches)
        losses, nonfinite = [], False
        for micro, batch in enumerate(batches):
            out = self.engine(
                batch=batch, loss_normalizers=normalizers, contrastive_cache=cache.at(micro) if cache else None
            )
            if FAULTS.nan_steps and self.step + 1 in FAULTS.nan_steps:
                out.loss = out.loss * float("nan")
            nonfinite |= not self.guards.finite_on_every_rank(out.loss, self.step + 1, kind)
            backward_and_step(self.engine, out.loss)
            if FAULTS.sample_log:
                log_samples(self.rank, self.step + 1, micro, kind, self.streams.current_keys(kind))
            self.streams.advance(kind)
            losses.append(out.loss.detach().float())
            stats.add(out, batch, self.model_config)
        self.guards.after_update(self.engine.was_step_applied(), nonfinite, self.step + 1)
        stats.seconds += time.perf_counter() - step_start
        stats.wait += self.streams.wait_seconds - wait_start
        loss = torch.stack(losses).mean().reshape(1)
        dist.all_reduce(loss, group=data_parallel_group())
        return loss.item() / self.dp_size

    def close(self) -> None:
        """End the loader workers and flush the scalar sinks (also on a fatal error: nothing here waits on peers)."""
        self.streams.close()
        self.log.close()

    # ---- guards -----------------------------------------------------------------------------------
    def _inject_error(self) -> None:
        if FAULTS.error_at == (self.rank, self.step + 1):
            raise IndexError(f"injected fault on rank {self.rank} at step {self.step + 1} (FLAVA_DS_INJECT_ERROR)")

    def _samples_seen(self) -> int:
        return self.step * self.accum * self.micro * self.dp_size

    # ---- checkpoints ------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": self.streams.state_dict(),
            "rng": checkpoint.rng_state(),
            **self.guards.state_dict(),  # skipped_steps, bad_samples
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
        cfg = self.config.checkpoint
        path = checkpoint.save(self.engine, cfg.save, self.step, self.client_state(), cfg.keep_last, sidecars, files)
        log.info("saved checkpoint %s", path)

    def _resume(self, load_dir: str) -> None:
        state = checkpoint.load(self.engine, load_dir, self.config.checkpoint.trusted_globals)
        if state is None:
            log.info("nothing to resume in %s: starting from step 0", load_dir)
            return
        self.step = int(state["step"])
        self.guards.load_state_dict(state)
        self.streams.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", load_dir, self.step)

    # ---- logging and evaluation -------------------------------------------------------------------
    def _interval_scalars(self, stats: IntervalStats) -> dict[str, float]:
        tp = self.config.train.tensor_parallel_size
        scalars = stats.scalars(data_parallel_group(), self.dp_size, self.micro, tp, self.peak)
        scalars.update(engine_scalars(self.engine))
        scalars.update(
            {
                "skipped_steps": float(self.guards.skipped_steps),
                "data/bad_samples": float(self.guards.bad_samples),
                "data/samples_seen": float(self._samples_seen()),
                **{f"data/epoch/{kind}": epoch for kind, epoch in self.streams.epochs().items()},
            }
        )
        return scalars

    def evaluate(self) -> None:
        if not (self.config.eval.image_text or self.config.eval.classification or self.config.eval.text):
            return
        from flava_ds.train.evaluate import evaluate

        self.log.eval(self.step, evaluate(self.engine.module, self.config, self.tokenizer, self.device))

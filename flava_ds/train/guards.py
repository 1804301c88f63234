"""What stops a run on its own: non-finite steps and bad samples (docs/RELIABILITY.md).

Every decision is taken by all ranks alike (each check reduces over the ranks first), so a rank never waits in a
collective its peers have left. The counters ride in every checkpoint (`state_dict`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from flava_ds.train.config import RunConfig

log = logging.getLogger("flava_ds.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class BadSampleError(RuntimeError):
    """More samples failed to decode than data.max_bad_sample_fraction allows."""


class StepGuards:
    def __init__(self, config: RunConfig, zero_stage: int, fp16: bool):
        self.config, self.zero_stage, self.fp16 = config, zero_stage, fp16
        # DeepSpeed skips a non-finite update itself with ZeRO-1/2 (any precision) and fp16 (any stage)
        self.can_skip_nonfinite = zero_stage in (1, 2) or fp16
        self.skipped_steps = self.nonfinite_in_row = 0
        self.bad_samples = 0  # over all data-parallel ranks, since step 0
        self.bad_local = 0  # this rank, since the last reduction

    def finite_on_every_rank(self, loss: torch.Tensor, step: int, kind: str) -> bool:
        """Whether every rank's micro-step loss is finite; where DeepSpeed cannot skip the update, a non-finite
        loss stops the run."""
        finite = torch.tensor([float(torch.isfinite(loss).item())])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0 and not self.can_skip_nonfinite:
            raise NonFiniteError(
                f"non-finite loss at step {step} ({kind} batch) with ZeRO stage {self.zero_stage} in fp32/bf16, "
                "where DeepSpeed cannot skip the update; stopping with the last checkpoint intact. Use ZeRO-1/2 or "
                "fp16 to skip such steps instead."
            )
        return bool(finite.item())

    def after_update(self, applied: bool, nonfinite: bool, step: int) -> None:
        """Count an update DeepSpeed skipped for a non-finite loss or gradient (fp16 also skips while it finds its
        loss scale); too many in a row stop the run."""
        if applied or not (nonfinite or not self.fp16):
            self.nonfinite_in_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} consecutive steps with a non-finite loss or gradient (last: step {step}); "
                "stopping with the last good checkpoint intact. Lower the lr or check the data."
            )

    def stop_requested(self, asked: bool, step: int, samples_read: int) -> bool:
        """One reduction after each step: did any rank ask to stop (signal, exit_at_step), and this step's bad
        samples; more than data.max_bad_sample_fraction of those read (checked after 1/fraction reads) stop."""
        flags = torch.tensor([float(asked), self.bad_local])
        dist.all_reduce(flags)
        self.bad_local = 0
        self.bad_samples += int(flags[1].item()) // self.config.train.tensor_parallel_size
        fraction = self.config.data.max_bad_sample_fraction
        if self.bad_samples > fraction * samples_read and (fraction == 0 or samples_read * fraction >= 1):
            raise BadSampleError(
                f"{self.bad_samples} of {samples_read} samples failed to decode by step {step} (more than "
                f"data.max_bad_sample_fraction={fraction}); stopping with the last checkpoint intact. The first "
                "failures are named in the log; check the shards with data.verify_checksums: true."
            )
        return bool(flags[0].item())

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_samples = int(state.get("bad_samples", 0))

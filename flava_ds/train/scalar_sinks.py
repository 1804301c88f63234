"""Where a run's scalars go on global rank 0: TensorBoard, and Weights & Biases when `logging.wandb.project` is
set (most OpenCLIP-style users read runs there; `wandb` is optional, not installed by default, and its offline
mode needs no network: `wandb sync` uploads later)."""

from __future__ import annotations

from typing import Any

from flava_ds.train.config import LoggingSection


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

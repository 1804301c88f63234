"""Start-up check of the data against the model and the run config, before anything heavy is built."""

from __future__ import annotations

from flava_ds.model import FlavaConfig
from flava_ds.train.config import RunConfig


def check_data(config: RunConfig, model_config: FlavaConfig) -> None:
    """Raise `ConfigError` naming the file and the field when a stream's data cannot fit the model."""

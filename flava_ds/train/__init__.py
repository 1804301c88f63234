"""Training engine: run config, data streams, DeepSpeed loop, checkpoints, evaluation."""

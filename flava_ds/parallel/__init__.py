"""Parallel state and layers (megatron-core), kept apart so the model reads the same at any TP size."""

"""flava_ds: pretrain FLAVA at cluster scale with DeepSpeed."""

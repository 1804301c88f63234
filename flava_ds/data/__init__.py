"""Readers, masking, samplers and batch building: shards on disk -> the model's batch dicts (docs/DESIGN.md §1).

Nothing is imported here: the converters import ``flava_ds.data.tokenizer`` and must not pay for torch and
megatron-core (seconds) before they have checked their inputs."""

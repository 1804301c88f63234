#!/usr/bin/env python
"""Pretrain FLAVA with DeepSpeed.

  deepspeed [--num_gpus N | --hostfile H] flava_ds/pretrain.py --deepspeed_config ds_configs/zero2.json \\
      --config configs/flava_full.yaml [--save DIR] [--load DIR] [--tensorboard-dir DIR] [--train-steps N] \\
      [--section.key value ...]

The same under `torchrun --nproc_per_node N flava_ds/pretrain.py ...` (and SLURM via srun + torchrun).
Any run-config key can be overridden as `--section.key value` (YAML syntax for the value), e.g.
`--train.log_interval 5 --data.kind_ratios '{image_text: 1, text: 0.5}' --deepspeed.bf16.enabled false`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Megatron-style flags that stand for a run-config key: (flag, type, the key it overrides, help).
SHORTCUTS: tuple[tuple[str, type, str, str], ...] = (
    ("--save", str, "checkpoint.save", "checkpoint directory"),
    ("--load", str, "checkpoint.load", "resume from this checkpoint directory's latest"),
    ("--tensorboard-dir", str, "logging.tensorboard_dir", "TensorBoard log directory"),
    ("--train-steps", int, "train.steps", "optimizer steps"),
    ("--tensor-model-parallel-size", int, "train.tensor_parallel_size", "TP size"),
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (ds_configs/*.json)")
    parser.add_argument("--config", help="run YAML (configs/*.yaml)")
    for flag, kind, key, text in SHORTCUTS:
        parser.add_argument(flag, type=kind, help=f"{text} ({key})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or "." not in flag:
            parser.error(f"unrecognised argument {flag!r}; run-config overrides look like --section.key value")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"{flag} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    for flag, _, key, _ in SHORTCUTS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append((key, str(value)))
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [rank %(rank)s] %(message)s")
    rank = os.environ.get("RANK", "0")
    old_factory = logging.getLogRecordFactory()

    def record_factory(*a, **kw):
        record = old_factory(*a, **kw)
        record.rank = rank
        return record

    logging.setLogRecordFactory(record_factory)

    from flava_ds.train.checkpoint import UntrustedCheckpointError, verified_checkpoint
    from flava_ds.train.config import ConfigError, RunConfig, load_deepspeed_config, model_config_of, validate
    from flava_ds.train.elastic import Topology, make_universal, needs_universal
    from flava_ds.train.preflight import check_data

    try:
        config = RunConfig.load(args.config, overrides)
        ds_config = load_deepspeed_config(args.deepspeed_config, config.deepspeed)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        micro, accum, total = validate(config, ds_config, world_size)  # before anything heavy is built
        check_data(config, model_config_of(config))
        tag, universal = None, False
        if config.checkpoint.load:  # refused here, before the model, rather than after it is built
            tag = verified_checkpoint(config.checkpoint.load, extra_trusted=config.checkpoint.trusted_globals)
        if tag is not None:  # another cluster shape: the same global batch, ZeRO partitions through universal
            tp = config.train.tensor_parallel_size
            stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
            try:
                universal = needs_universal(
                    Path(config.checkpoint.load, tag), Topology(world_size // tp, tp, micro, accum, stage)
                )
            except ValueError as err:
                raise ConfigError(f"checkpoint.load: {err}") from err
    except ConfigError as err:
        sys.exit(f"flava_ds: configuration error: {err}")
    except UntrustedCheckpointError as err:
        sys.exit(f"flava_ds: checkpoint refused: {err}")
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=total)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    import datetime

    import deepspeed

    from flava_ds.train.signals import exit_on_fatal_error
    from flava_ds.train.trainer import COMPLETE_MARKER, STOPPED_MARKER, Trainer

    trainer = None
    try:  # any error from here on ends this rank at once (with its reason), never a hang at exit
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=config.train.collective_timeout_s))
        if universal:  # before the model exists: the conversion's worker processes fork from a small process
            make_universal(config.checkpoint.load, tag)
        trainer = Trainer(config, ds_config, micro, accum)
        trainer.train()
        trainer.close()
    except (Exception, KeyboardInterrupt) as err:
        exit_on_fatal_error(err, int(rank), trainer.close if trainer is not None else None)
    marker = STOPPED_MARKER if trainer.stopped_early else COMPLETE_MARKER
    print(f"{marker} at step {trainer.step} (rank {rank})", flush=True)


if __name__ == "__main__":
    main()

"""The run configuration: one YAML file of sections, dotted command-line overrides, validated up front.

    model:      preset, overrides, init checkpoints
    data:       tokenizer, shard directories per stream with blend weights, task ratios, masking
    optimizer:  AdamW settings and which parameters skip weight decay
    schedule:   linear warmup + cosine decay
    train:      steps, seeds, global batch, intervals, fault tolerance
    checkpoint: save/load directories, how many to keep
    eval:       held-out shards, prompts
    logging:    TensorBoard directory, GPU peak FLOP/s
    deepspeed:  entries deep-merged into the --deepspeed_config JSON

Everything that can be checked without building the model is checked in `validate()`, so a wrong
config fails in a second with one clear message instead of after the model is allocated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STREAMS = ("image_text", "image", "text")


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and what to do."""


@dataclass
class InitConfig:
    model: str | None = None  # whole model: a transformers FLAVA dir or a flava_ds export
    image_encoder: str | None = None  # a transformers ViT dir (e.g. DINO ViT-B/16) or a FLAVA dir
    text_encoder: str | None = None  # a FLAVA dir / flava_ds export (e.g. an MLM-only run)


@dataclass
class ModelSection:
    preset: str = "full"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: InitConfig = field(default_factory=InitConfig)


@dataclass
class StreamConfig:
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # blend weights, one per path (default: equal)


@dataclass
class DataSection:
    tokenizer: str | None = None
    image_text: StreamConfig = field(default_factory=StreamConfig)
    image: StreamConfig = field(default_factory=StreamConfig)
    text: StreamConfig = field(default_factory=StreamConfig)
    task_ratios: dict[str, float] = field(default_factory=lambda: {"image_text": 1.0})
    text_max_length: int = 128
    mlm_prob: float = 0.15
    itm_negative_prob: float = 0.1
    num_workers: int = 2
    seed: int = 1234
    verify_checksums: bool = False  # sha256 of every shard against its manifest at start-up (sizes are always checked)
    # samples that fail to read or decode are replaced and counted; more than this fraction of the samples read
    # stops the run (checked once 1/fraction samples were read, so one early bad sample cannot stop it)
    max_bad_sample_fraction: float = 0.001


@dataclass
class OptimizerSection:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # parameter-name fragments that get no weight decay (biases, norms, embeddings-like tokens, temperature)
    no_decay: list[str] = field(
        default_factory=lambda: ["bias", "norm", "cls_token", "mask_token", "pos_embed", "embeddings", "logit_scale"]
    )


@dataclass
class ScheduleSection:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass
class TrainSection:
    steps: int = 1000
    seed: int = 1234
    global_batch_size: int | None = None  # checked against DeepSpeed micro x accumulation x data-parallel size
    tensor_parallel_size: int = 1
    log_interval: int = 10
    eval_interval: int = 0  # 0 = only at the end
    save_interval: int = 0  # 0 = only at the end
    exit_at_step: int | None = None  # checkpoint and exit here (scheduled preemption); the schedule still spans steps
    max_nonfinite_steps: int = 5  # this many skipped updates in a row stop the run
    stop_deadline_s: float = 120.0  # after SIGTERM/SIGUSR1: checkpoint and exit within this


@dataclass
class CheckpointSection:
    save: str | None = None
    load: str | None = None
    keep_last: int = 3
    trusted_globals: list[str] = field(default_factory=list)  # extra pickle globals allowed in DeepSpeed files


@dataclass
class EvalSection:
    image_text: list[str] = field(default_factory=list)  # held-out image-text shards: retrieval + ITM
    classification: list[str] = field(default_factory=list)  # labelled image shards with classes.json
    prompts: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    text: list[str] = field(default_factory=list)  # held-out text: MLM accuracy
    max_samples: int = 512
    batch_size: int = 32


@dataclass
class LoggingSection:
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None  # per device; None = look the GPU up in a table
    metrics_file: str | None = None  # JSON lines: every step's loss, every log interval's scalars, eval results


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
        raw: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file")
            raw = yaml.safe_load(path.read_text()) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for dotted, value in overrides:
            _set_dotted(raw, dotted, yaml.safe_load(value))
        return _build(cls, raw, "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {name!r} is not a section")
    node[leaf] = value


def _build(cls: type, values: Any, where: str):
    """Build nested dataclasses from a dict, naming any unknown key with its full path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = _dataclass_type(known[name].type)
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub is not None else value
    return cls(**kwargs)


_SECTIONS = {
    c.__name__: c
    for c in (
        InitConfig,
        ModelSection,
        StreamConfig,
        DataSection,
        OptimizerSection,
        ScheduleSection,
        TrainSection,
        CheckpointSection,
        EvalSection,
        LoggingSection,
    )
}


def _dataclass_type(annotation: Any) -> type | None:
    return _SECTIONS.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def load_deepspeed_config(path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from err
    return _deep_merge(config, overrides)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def batch_geometry(ds_config: dict[str, Any], dp_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, global batch) from a DeepSpeed config, filled like DeepSpeed."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if micro is None and total is not None and accum is not None:
        micro = total // (accum * dp_size)
    if accum is None and micro is not None and total is not None:
        accum = total // (micro * dp_size)
    micro, accum = micro or 1, accum or 1
    total = total if total is not None else micro * accum * dp_size
    if micro * accum * dp_size != total:
        raise ConfigError(
            f"DeepSpeed batch: train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({accum}) x "
            f"data-parallel size ({dp_size}) = {micro * accum * dp_size} != train_batch_size ({total})"
        )
    return micro, accum, total


def validate(config: RunConfig, ds_config: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """Refuse an inconsistent run before anything is allocated. Returns the batch geometry."""
    tp = config.train.tensor_parallel_size
    if tp < 1 or world_size % tp:
        raise ConfigError(f"train.tensor_parallel_size={tp} does not divide the world size {world_size}")
    micro, accum, total = batch_geometry(ds_config, world_size // tp)
    if config.train.global_batch_size is not None and config.train.global_batch_size != total:
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} but micro batch {micro} x accumulation "
            f"{accum} x data-parallel size {world_size // tp} = {total}; fix one of them"
        )
    ratios = config.data.task_ratios
    unknown = sorted(set(ratios) - set(STREAMS))
    if unknown:
        raise ConfigError(f"data.task_ratios: unknown task(s) {unknown}; tasks are {list(STREAMS)}")
    if not any(r > 0 for r in ratios.values()) or any(r < 0 for r in ratios.values()):
        raise ConfigError(f"data.task_ratios must be non-negative with at least one positive: {ratios}")
    for task, ratio in ratios.items():
        stream: StreamConfig = getattr(config.data, task)
        if ratio > 0 and not stream.paths:
            raise ConfigError(f"data.task_ratios.{task}={ratio} but data.{task}.paths is empty: give it shard dirs")
        if stream.weights is not None and len(stream.weights) != len(stream.paths):
            raise ConfigError(f"data.{task}.weights has {len(stream.weights)} entries for {len(stream.paths)} paths")
    for task in STREAMS:
        for p in getattr(config.data, task).paths:
            if not Path(p).exists():
                raise ConfigError(f"data.{task}.paths: {p} does not exist; run the preprocess tools first")
    needs_text = any(ratios.get(t, 0) > 0 for t in ("image_text", "text")) or config.eval.image_text
    if needs_text and not (config.data.tokenizer and Path(config.data.tokenizer).is_file()):
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} is not a file; text streams need the tokenizer")
    for key in ("image_text", "classification", "text"):
        for p in getattr(config.eval, key):
            if not Path(p).exists():
                raise ConfigError(f"eval.{key}: {p} does not exist")
    if config.train.steps < 1 or config.train.log_interval < 1:
        raise ConfigError("train.steps and train.log_interval must be >= 1")
    if not 0.0 <= config.data.max_bad_sample_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_sample_fraction must be in [0, 1], got {config.data.max_bad_sample_fraction}")
    if config.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    return micro, accum, total


def model_config_of(config: RunConfig):
    """The run's `FlavaConfig` (preset + overrides), or a `ConfigError` naming the bad key."""
    from flava_ds.model import FlavaConfig

    try:
        return FlavaConfig.preset(config.model.preset, **config.model.overrides)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.preset={config.model.preset!r} / model.overrides: {err}") from err

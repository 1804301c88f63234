"""The run configuration: one YAML file of sections, dotted command-line overrides, validated up front.

    model:      preset, overrides, init checkpoints
    data:       tokenizer, shard directories per stream with blend weights, kind ratios, masking
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
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from flava_ds.batch import KINDS
from flava_ds.dataclass_config import ConfigError, bounded, build, coerce, merge_overrides

if TYPE_CHECKING:
    from flava_ds.model.config import FlavaConfig

STREAMS = KINDS  # one data stream per batch kind, named after it


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
    kind_ratios: dict[str, float] = field(default_factory=lambda: {"image_text": 1.0})
    text_max_length: int = bounded(128, low=2)
    mlm_prob: float = bounded(0.15, 0.0, 1.0, open="both")
    itm_negative_prob: float = bounded(0.1, 0.0, 1.0, open="high")
    num_workers: int = bounded(2, low=0)
    seed: int = 1234
    verify_checksums: bool = False  # sha256 of every shard against its manifest at start-up (sizes are always checked)
    # samples that fail to read or decode are replaced and counted; more than this fraction of the samples read
    # stops the run (checked once 1/fraction samples were read, so one early bad sample cannot stop it)
    max_bad_sample_fraction: float = bounded(0.001, 0.0, 1.0)

    def active_ratios(self) -> dict[str, float]:
        """The batch kinds the run draws (ratio > 0) with their ratios, once the ratios are checked: the one place
        the run's validation, its data check and its loaders learn which streams it reads."""
        ratios = self.kind_ratios
        unknown = sorted(set(ratios) - set(STREAMS))
        if unknown:
            raise ConfigError(f"data.kind_ratios: unknown kind(s) {unknown}; kinds are {list(STREAMS)}")
        if not any(r > 0 for r in ratios.values()) or any(r < 0 for r in ratios.values()):
            raise ConfigError(f"data.kind_ratios must be non-negative with at least one positive: {ratios}")
        return {kind: ratio for kind, ratio in ratios.items() if ratio > 0}


@dataclass
class OptimizerSection:
    lr: float = bounded(1e-3, low=0.0, open="low")
    weight_decay: float = bounded(0.1, low=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = bounded(1e-8, low=0.0, open="low")
    # parameter-name fragments that get no weight decay (biases, norms, embeddings-like tokens, temperature)
    no_decay: list[str] = field(
        default_factory=lambda: ["bias", "norm", "cls_token", "mask_token", "pos_embed", "embeddings", "logit_scale"]
    )


@dataclass
class ScheduleSection:
    warmup_steps: int = bounded(100, low=0)
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)


@dataclass
class TrainSection:
    steps: int = bounded(1000, low=1)
    seed: int = 1234
    global_batch_size: int | None = bounded(
        None, low=1
    )  # checked against DeepSpeed micro x accumulation x data-parallel size
    tensor_parallel_size: int = bounded(1, low=1)
    log_interval: int = bounded(10, low=1)
    eval_interval: int = bounded(0, low=0)  # 0 = only at the end
    save_interval: int = bounded(0, low=0)  # 0 = only at the end
    exit_at_step: int | None = bounded(
        None, low=1
    )  # checkpoint and exit here (scheduled preemption); the schedule still spans steps
    # a collective waiting longer than this for a peer fails (a peer that hangs or died without closing its
    # connections), so every rank ends instead of waiting forever; it must exceed the slowest checkpoint save
    collective_timeout_s: float = bounded(900.0, low=0.0, open="low")
    max_nonfinite_steps: int = bounded(5, low=1)  # this many skipped updates in a row stop the run
    # under gradient accumulation, the contrastive loss of an image-text step scores against the whole global
    # batch (GradCache: one extra forward of the unmasked views, without gradient); false: against the micro-batch
    contrastive_cache: bool = True
    stop_deadline_s: float = bounded(
        120.0, low=0.0, open="low"
    )  # after SIGTERM/SIGUSR1: checkpoint and exit within this


@dataclass
class CheckpointSection:
    save: str | None = None
    load: str | None = None
    keep_last: int = bounded(3, low=1)
    trusted_globals: list[str] = field(default_factory=list)  # extra pickle globals allowed in DeepSpeed files


@dataclass
class EvalSection:
    image_text: list[str] = field(default_factory=list)  # held-out image-text shards: retrieval + ITM
    classification: list[str] = field(default_factory=list)  # labelled image shards with classes.json
    prompts: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    text: list[str] = field(default_factory=list)  # held-out text: MLM accuracy
    max_samples: int = bounded(512, low=1)
    batch_size: int = bounded(32, low=1)


@dataclass
class WandbSection:
    project: str | None = None  # set: log every scalar to Weights & Biases too (pip install wandb)
    mode: str = "online"  # online, offline (no network; `wandb sync` later) or disabled
    name: str | None = None  # the run's name (default: wandb's)
    dir: str | None = None  # where wandb keeps its files (default: ./wandb)


@dataclass
class LoggingSection:
    tensorboard_dir: str | None = None
    wandb: WandbSection = field(default_factory=WandbSection)
    peak_tflops: float | None = bounded(None, low=0.0, open="low")  # per device; None = look the GPU up in a table
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
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for dotted, value in overrides:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"--{dotted} {value!r}: not a YAML value ({' '.join(str(err).split())})") from err
            _set_dotted(raw, dotted, parsed)
        _read_old_names(raw)
        return build(cls, raw, "config")

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


def _read_old_names(raw: dict[str, Any]) -> None:
    """Keys renamed since, still read: older run YAMLs and the run_config.json of older checkpoints."""
    data = raw.get("data")
    if isinstance(data, dict) and "task_ratios" in data:
        if "kind_ratios" in data:
            raise ConfigError("data: task_ratios (the old name of kind_ratios) and kind_ratios both given; keep one")
        data["kind_ratios"] = data.pop("task_ratios")


def load_deepspeed_config(path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from err
    return merge_overrides(config, overrides)


def batch_geometry(ds_config: dict[str, Any], dp_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, global batch) from a DeepSpeed config, filled like DeepSpeed."""
    micro, accum, total = (
        coerce(ds_config.get(key), int | None, "config", f"deepspeed.{key}")
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    )
    for value, key in ((micro, "train_micro_batch_size_per_gpu"), (accum, "gradient_accumulation_steps")):
        if value is not None and value < 1:
            raise ConfigError(f"deepspeed.{key}: {value} must be >= 1")
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
    active = config.data.active_ratios()
    if not all(0.0 <= b < 1.0 for b in config.optimizer.betas):
        raise ConfigError(f"optimizer.betas: {list(config.optimizer.betas)} must each be in [0, 1)")
    for template in config.eval.prompts:
        if "{}" not in template:
            raise ConfigError(f"eval.prompts: {template!r} has no '{{}}' where the class name goes")
    for kind, ratio in config.data.kind_ratios.items():
        stream: StreamConfig = getattr(config.data, kind)
        if kind in active and not stream.paths:
            raise ConfigError(f"data.kind_ratios.{kind}={ratio} but data.{kind}.paths is empty: give it shard dirs")
        if stream.weights is not None and len(stream.weights) != len(stream.paths):
            raise ConfigError(f"data.{kind}.weights has {len(stream.weights)} entries for {len(stream.paths)} paths")
        if stream.weights is not None and not (all(w >= 0 for w in stream.weights) and sum(stream.weights) > 0):
            raise ConfigError(f"data.{kind}.weights must be non-negative with a positive sum: {stream.weights}")
    if config.logging.wandb.project:
        if config.logging.wandb.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logging.wandb.mode={config.logging.wandb.mode!r}: use online, offline or disabled")
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb.project is set but wandb is not installed: pip install wandb")
    for kind in STREAMS:
        for p in getattr(config.data, kind).paths:
            if not Path(p).exists():
                raise ConfigError(f"data.{kind}.paths: {p} does not exist; run the preprocess tools first")
    needs_text = active.keys() & {"image_text", "text"} or config.eval.image_text
    if needs_text and not (config.data.tokenizer and Path(config.data.tokenizer).is_file()):
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} is not a file; text streams need the tokenizer")
    for key in ("image_text", "classification", "text"):
        for p in getattr(config.eval, key):
            if not Path(p).exists():
                raise ConfigError(f"eval.{key}: {p} does not exist")
    return micro, accum, total


def model_config_of(config: RunConfig) -> FlavaConfig:
    """The run's `FlavaConfig` (preset + overrides, each value converted to its declared type), checked for the
    run's tensor-parallel size; a `ConfigError` naming the bad key otherwise."""
    from flava_ds.model.config import PRESETS, FlavaConfig, validate_for_tensor_parallel

    if config.model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {config.model.preset!r}; choose one of {sorted(PRESETS)}")
    merged = merge_overrides(PRESETS[config.model.preset], config.model.overrides)
    try:
        model_config = FlavaConfig.from_dict(merged, "config", "model.overrides")
        validate_for_tensor_parallel(model_config, config.train.tensor_parallel_size)
    except ConfigError:
        raise
    except ValueError as err:  # FlavaConfig.validate's own checks
        raise ConfigError(f"model.overrides: {err}") from err
    return model_config

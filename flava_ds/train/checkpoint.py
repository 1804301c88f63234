"""Checkpoints through the DeepSpeed engine, with a `latest` pointer published atomically last.

A run killed mid-save leaves a partial `global_stepN/` directory that `latest` never names, so a
resume always starts from the last complete checkpoint. The trainer's own state (step, data
position, RNG) rides in DeepSpeed's client state.

DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)`` (0.19.8 has no switch for it),
i.e. unpickling can run code. Before handing a checkpoint to DeepSpeed (resume, export), ``verified_checkpoint``
accepts only ``global_step<N>`` tags (so the files scanned are exactly the files DeepSpeed globs) and
``check_pickles`` lists the globals every ``.pt`` file would import, without unpickling it, and refuses any
outside the set DeepSpeed's own checkpoints use, so a tampered checkpoint is refused instead of executed.
"""

from __future__ import annotations

import glob
import json
import random
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flava_ds.shard_format import atomic_write_bytes
from flava_ds.train.elastic import universal_load_repairs, universal_tag
from flava_ds.train.faults import FAULTS
from flava_ds.train.sidecars import carry_to_export

LATEST = "latest"
MODEL_CONFIG = "flava_config.json"
RUN_CONFIG = "run_config.json"
_TAG = re.compile(r"^global_step(\d+)$")
_UNIVERSAL_TAG = re.compile(r"^global_step(\d+)_universal$")  # flava_ds.train.elastic's conversions
# Globals beyond torch's weights_only set that DeepSpeed checkpoints and our client state (numpy RNG state) contain,
# listed from ZeRO 0-3 fp32/bf16 checkpoints (fp16 pickles its DynamicLossScaler the same way): plain DeepSpeed data
# classes and numpy's array reconstruction.
TRUSTED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    }
)


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file whose pickle would import something DeepSpeed's own checkpoints never do."""


def check_pickles(directory: str | Path, extra_trusted: Iterable[str] = ()) -> None:
    """Refuse `directory` if any of its `.pt` files would import a global outside TRUSTED_GLOBALS.

    Only the pickle's opcodes are read (torch's own scanner): nothing is imported or executed. Sub-directories
    too: a universal checkpoint keeps one folder of files per parameter."""
    trusted = TRUSTED_GLOBALS | set(extra_trusted)
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a torch zip file at all: DeepSpeed would unpickle it raw
            raise UntrustedCheckpointError(
                f"{path}: not a torch checkpoint archive ({err}); refusing to load it"
            ) from err
        unknown = sorted(set(found) - trusted)
        if unknown:
            raise UntrustedCheckpointError(
                f"{path}: the pickle imports {unknown}, which DeepSpeed checkpoints never contain; refusing to "
                "load it (it could run code). If you wrote this checkpoint yourself with another DeepSpeed "
                "version, list the names in checkpoint.trusted_globals."
            )


def checkpoint_dir(directory: str | Path, tag: str) -> Path:
    """`directory/tag`, refused unless it names exactly the files DeepSpeed will open.

    DeepSpeed finds a checkpoint's files with `glob` under `directory/tag`, while a scan reads the literal
    path: a `latest` holding `evi[l]` would send DeepSpeed to the unscanned files of `evil/`. Tags are
    therefore only ever `global_step<N>` (or its universal conversion `global_step<N>_universal`), and the
    directory may hold no glob pattern characters."""
    if not (_TAG.match(tag) or _UNIVERSAL_TAG.match(tag)):
        raise UntrustedCheckpointError(
            f"{directory}: checkpoint tag {tag!r} (from '{LATEST}' or --tag) is not global_step<N>; refusing it. "
            f"Fix '{LATEST}' to name one of the global_step<N> directories."
        )
    if glob.has_magic(str(directory)):
        raise UntrustedCheckpointError(
            f"{directory}: a checkpoint directory may not contain *, ? or [ (DeepSpeed globs below it); rename it"
        )
    return Path(directory) / tag


def verified_checkpoint(directory: str | Path, tag: str | None = None, extra_trusted: Iterable[str] = ()) -> str | None:
    """The tag to load from `directory` (`tag`, else what `latest` names; None if there is none), after checking
    the tag and every pickle DeepSpeed will open: nothing is unpickled, nothing runs."""
    tag = tag or read_latest(directory)
    if tag is not None:
        check_pickles(checkpoint_dir(directory, tag), extra_trusted)
    return tag


def tag_for(step: int) -> str:
    return f"global_step{step}"


def publish_latest(save_dir: Path, tag: str) -> None:
    atomic_write_bytes(save_dir / LATEST, tag.encode())


def read_latest(directory: str | Path) -> str | None:
    path = Path(directory) / LATEST
    return path.read_text().strip() if path.is_file() else None


def prune(save_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    latest = read_latest(save_dir)
    tags = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if (m := _TAG.match(p.name)) and p.is_dir())
    latest_step = int(_TAG.match(latest).group(1)) if latest and _TAG.match(latest) else None
    complete = [(s, p) for s, p in tags if latest_step is None or s <= latest_step]
    for _, path in complete[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)
    for step, path in tags:  # partial saves newer than `latest` are leftovers of a killed run
        if latest_step is not None and step > latest_step:
            shutil.rmtree(path, ignore_errors=True)
    kept = {path.name for _, path in tags if path.is_dir()}
    for path in save_dir.iterdir():  # conversions of checkpoints that are gone
        if (m := _UNIVERSAL_TAG.match(path.name)) and tag_for(int(m.group(1))) not in kept:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    save_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    json_files: dict[str, Any],
    files: dict[str, Path],
) -> Path:
    """DeepSpeed's files, then (global rank 0) `json_files` beside them (name -> content: what tools read
    without unpickling, e.g. the model config) and copies of `files` (name -> source, e.g. the tokenizer), then
    `latest`."""
    save_dir = Path(save_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if FAULTS.save_delay_s:  # fault injection: hold the window between the files and `latest`
        time.sleep(FAULTS.save_delay_s)
    if dist.get_rank() == 0:
        for name, content in json_files.items():
            (save_dir / tag / name).write_text(json.dumps(content, indent=2))
        for name, source in files.items():
            shutil.copyfile(source, save_dir / tag / name)
        publish_latest(save_dir, tag)
        prune(save_dir, keep_last)
    dist.barrier()
    return save_dir / tag


def load(engine, load_dir: str | Path, trusted_globals: Iterable[str] = ()) -> dict[str, Any] | None:
    """Resume from `latest` in `load_dir` (its universal conversion when the engine loads universal
    checkpoints: `flava_ds.train.elastic`); None when there is nothing to resume from."""
    tag = verified_checkpoint(load_dir, extra_trusted=trusted_globals)
    if tag is None:
        return None
    if engine.load_universal_checkpoint():
        tag = verified_checkpoint(load_dir, universal_tag(tag), trusted_globals)
    with universal_load_repairs(engine):
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{load_dir}/{tag}: DeepSpeed could not load this checkpoint")
    return client_state


def export(save_dir: str | Path, output: str | Path, tag: str | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage) into one fp32 flava_ds export directory: the fp32 master
    weights of the optimizer state (ZeRO 1-3, bf16), or the module itself in fp32 ZeRO-0; the checkpoint's
    processing record and training.json come along (`flava_ds.train.sidecars`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from flava_ds.model import FlavaConfig, FlavaForPreTraining

    tag = verified_checkpoint(save_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"{save_dir}: no '{LATEST}' file; pass the checkpoint tag explicitly")
    config = FlavaConfig.from_dict(json.loads((Path(save_dir) / tag / MODEL_CONFIG).read_text()))
    tp_ranks = sorted((Path(save_dir) / tag).glob("mp_rank_*_model_states.pt"))
    if len(tp_ranks) > 1:
        raise NotImplementedError(
            f"{save_dir}/{tag} was written with tensor parallelism ({len(tp_ranks)} TP ranks); offline export "
            "supports TP=1 checkpoints. Export from a running TP job with model.save_pretrained (which gathers "
            "the shards) instead."
        )
    directory = Path(save_dir) / tag
    model = FlavaForPreTraining(config)

    def whole_weights() -> dict[str, torch.Tensor]:
        """The model states' module: every weight whole at ZeRO 0-2, in the training dtype (globals checked above)."""
        (states,) = directory.glob("mp_rank_00_model_states.pt")
        return torch.load(states, map_location="cpu", weights_only=False)["module"]

    if list(directory.glob("*optim_states.pt")):  # ZeRO 1-3, or bf16: the fp32 master weights are there
        state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    else:  # ZeRO-0 in fp32 (fp16 is the only other way to have no optimizer partitions, and cannot run there)
        state = dict(whole_weights())
        if any(t.dtype != torch.float32 for t in state.values()):
            raise NotImplementedError(f"{directory}: ZeRO-0 fp16 keeps no fp32 master weights on disk; use ZeRO-1")
    # frozen parameters (the poolers) have no optimizer state, so ZeRO-1 leaves them out: they never change
    missing = {name for name, p in model.named_parameters() if not p.requires_grad} - state.keys()
    if missing:
        module = whole_weights()
        state.update({name: module[name].float() for name in missing})
    model.load_state_dict(state)
    model.save_pretrained(output)
    carry_to_export(directory, Path(output))
    return Path(output)

"""Read and write `transformers`-style checkpoint directories without importing `transformers`.

A directory holds `config.json` plus weights as `model.safetensors`, a sharded
`model.safetensors.index.json`, or a legacy `pytorch_model.bin` (read with `weights_only=True`,
so a checkpoint carrying an arbitrary pickle is refused rather than executed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked; the message names the file and key."""


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a transformers save_pretrained directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / shard)))
        return state
    if legacy.is_file():
        try:
            return torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling error is the refusal of an unsafe file
            raise CheckpointError(f"{legacy}: refused to load ({err}); convert it to safetensors") from err
    raise CheckpointError(
        f"{directory}: no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def write_checkpoint(directory: str | Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def expect_keys(where: str, got: set[str], want: set[str]) -> None:
    """Raise naming the first missing and unexpected keys so a mismatched checkpoint is obvious."""
    missing, unexpected = sorted(want - got), sorted(got - want)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: state dict does not match the model: "
            f"{len(missing)} missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
        )

"""Initialising a run from existing weights: the whole model, or each encoder separately (FLAVA's unimodal init).

* whole model: a `transformers` FLAVA directory or a flava_ds export;
* image encoder: a `transformers` ViT directory (e.g. DINO ViT-B/16, keys `vit.*` or bare) or a FLAVA dir;
* text encoder: a FLAVA directory or flava_ds export (e.g. an MLM-only run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flava_ds.model import CheckpointError, FlavaForPreTraining
from flava_ds.model.hf_io import read_config, read_state_dict
from flava_ds.model.interop import hf_names
from flava_ds.train.config import InitConfig

log = logging.getLogger(__name__)


def _copy(model: FlavaForPreTraining, prefix: str, source: dict[str, torch.Tensor], where: str) -> int:
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = sorted(set(target) - set(source))
    if missing:
        raise CheckpointError(
            f"{where}: has no weights for {len(missing)} parameters of {prefix} (first: {missing[:3]})"
        )
    for name, tensor in target.items():
        if source[name].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(source[name].shape)}, the model {tuple(tensor.shape)}"
            )
    model.load_state_dict({**model.state_dict(), **{k: source[k] for k in target}})
    return len(target)


def _from_flava(model: FlavaForPreTraining, path: str) -> dict[str, torch.Tensor]:
    return FlavaForPreTraining.from_pretrained(path).state_dict()


def _image_encoder_from_vit(model: FlavaForPreTraining, path: str) -> dict[str, torch.Tensor]:
    """Map a ViT checkpoint onto our image encoder through the FLAVA image-model names it shares."""
    raw = {k.removeprefix("vit."): v for k, v in read_state_dict(path).items()}
    out = {}
    for name in model.state_dict():
        if not name.startswith("image_encoder."):
            continue
        parts = [raw.get(n.removeprefix("flava.image_model.")) for n in hf_names(name)]
        if all(p is not None for p in parts):
            out[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    own = model.state_dict()
    for name in ("image_encoder.mask_token", "image_encoder.pooler.weight", "image_encoder.pooler.bias"):
        out.setdefault(name, own[name])  # a ViT has no mask token, and a classifier ViT no pooler: keep the init
    return out


def initialize_from_checkpoints(model: FlavaForPreTraining, init: InitConfig) -> None:
    for path in (init.model, init.image_encoder, init.text_encoder):
        if path and not Path(path).is_dir():
            raise CheckpointError(f"model.init: {path} is not a directory")
    if init.model:
        n = _copy(model, "", _from_flava(model, init.model), init.model)
        log.info("initialised all %d tensors from %s", n, init.model)
    if init.image_encoder:
        model_type = read_config(init.image_encoder).get("model_type")
        source = (
            _image_encoder_from_vit(model, init.image_encoder)
            if model_type in ("vit", "dinov2", None)
            else _from_flava(model, init.image_encoder)
        )
        n = _copy(model, "image_encoder.", source, init.image_encoder)
        log.info("initialised the image encoder (%d tensors) from %s", n, init.image_encoder)
    if init.text_encoder:
        n = _copy(model, "text_encoder.", _from_flava(model, init.text_encoder), init.text_encoder)
        log.info("initialised the text encoder (%d tensors) from %s", n, init.text_encoder)

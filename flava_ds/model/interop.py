"""Key-for-key conversion between this model and `transformers.FlavaForPreTraining` checkpoints.

Our blocks fuse Q, K and V into one `qkv` projection (rows [q; k; v]); everything else is a rename.
`transformers` ties each masked head's `bias` to its `decoder.bias`; the tied copy is ignored on load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flava_ds.model.config import FlavaConfig, ImageConfig, MultimodalConfig, TextConfig, merge_overrides
from flava_ds.model.hf_io import CheckpointError, expect_keys, read_config, read_state_dict, write_checkpoint
from flava_ds.parallel.sharding import full_state_template
from flava_ds.parallel.state import is_global_rank_zero
from flava_ds.shard_format import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import nn

    from flava_ds.model.flava import FlavaForPreTraining

_HEADS = r"(mim|mlm|mmm_image|mmm_text)_head"
_RULES: list[tuple[str, str]] = [
    (r"^image_encoder\.patch_embed\.", "flava.image_model.embeddings.patch_embeddings.projection."),
    (r"^image_encoder\.(cls_token|mask_token)$", r"flava.image_model.embeddings.\1"),
    (r"^image_encoder\.pos_embed$", "flava.image_model.embeddings.position_embeddings"),
    (
        r"^text_encoder\.(word|position|token_type)_embeddings\.",
        r"flava.text_model.embeddings.\1_embeddings.",
    ),
    (r"^text_encoder\.embed_norm\.", "flava.text_model.embeddings.LayerNorm."),
    (r"^multimodal_encoder\.cls_token$", "flava.multimodal_model.cls_token"),
    (r"^(image|text|multimodal)_encoder\.encoder\.layers\.(\d+)\.", r"flava.\1_model.encoder.layer.\2."),
    (r"^(image|text|multimodal)_encoder\.final_norm\.", r"flava.\1_model.layernorm."),
    (r"^(image|text|multimodal)_encoder\.pooler\.", r"flava.\1_model.pooler.dense."),
    (
        r"^(image_projection|text_projection|image_to_mm_projection|text_to_mm_projection|logit_scale)",
        r"flava.\1",
    ),
    (_HEADS + r"\.dense\.", r"\1_head.transform.dense."),
    (_HEADS + r"\.norm\.", r"\1_head.transform.LayerNorm."),
    (r"^itm_head\.pooler\.", "itm_head.pooler.dense."),
    (r"^itm_head\.classifier\.", "itm_head.seq_relationship."),
]
_LAYER_RULES: list[tuple[str, str]] = [
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.proj\.", ".attention.output.dense."),
    (r"\.mlp_in\.", ".intermediate.dense."),
    (r"\.mlp_out\.", ".output.dense."),
]
_HF_SHAPES = {"logit_scale": ()}  # transformers keeps the temperature as a 0-dim tensor; we keep shape (1,)
_QKV = re.compile(r"\.attn\.qkv\.(weight|bias)$")


def hf_names(name: str) -> list[str]:
    """Our parameter name -> the `transformers` name(s) holding it (three for a fused qkv)."""
    for pattern, repl in _RULES:
        name = re.sub(pattern, repl, name)
    if ".encoder.layer." in name:
        for pattern, repl in _LAYER_RULES:
            name = re.sub(pattern, repl, name)
        match = _QKV.search(name)
        if match:
            stem = name[: match.start()]
            return [f"{stem}.attention.attention.{part}.{match.group(1)}" for part in ("query", "key", "value")]
    return [name]


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        targets = hf_names(name)
        parts = (
            tensor.chunk(len(targets), dim=0)
            if len(targets) > 1
            else [tensor.reshape(_HF_SHAPES.get(name, tensor.shape))]
        )
        for target, part in zip(targets, parts):
            out[target] = part.clone()
    return out


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], template: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """hf tensors -> our state dict shaped like `template`; names the key on any mismatch."""
    wanted = {target for name in template for target in hf_names(name)}
    present = {k for k in hf_state if not k.startswith("image_codebook.") and not re.fullmatch(_HEADS + r"\.bias", k)}
    expect_keys(where, present, wanted)
    state = {}
    for name, like in template.items():
        tensor = (
            torch.cat([hf_state[t] for t in hf_names(name)], dim=0)
            if _QKV.search(name)
            else hf_state[hf_names(name)[0]]
        )
        if name in _HF_SHAPES and tensor.numel() == like.numel():
            tensor = tensor.reshape(like.shape)
        if tensor.shape != like.shape:
            raise CheckpointError(
                f"{where}: key {hf_names(name)[0]!r} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(like.shape)}; the config does not match the weights"
            )
        state[name] = tensor.to(like.dtype)
    return state


# ---- configs ------------------------------------------------------------------------------------------
_ENCODER_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_size",
    "layer_norm_eps": "layer_norm_eps",
    "qkv_bias": "qkv_bias",
}
_IMAGE_KEYS = {
    **_ENCODER_KEYS,
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "vocab_size": "codebook_vocab_size",
}
_TEXT_KEYS = {
    **_ENCODER_KEYS,
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
}
_TOP_KEYS = {
    "projection_dim": "projection_dim",
    "logit_scale_init_value": "logit_scale_init",
    "initializer_range": "initializer_range",
    "mim_weight": "mim_weight",
    "mlm_weight": "mlm_weight",
    "itm_weight": "itm_weight",
    "global_contrastive_weight": "global_contrastive_weight",
    "mmm_image_weight": "mmm_image_weight",
    "mmm_text_weight": "mmm_text_weight",
    "global_backprop_contrastive": "global_backprop_contrastive",
}
# Values this implementation fixes; a checkpoint asking for anything else is refused with the key named.
_FIXED = {"hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _sub_from_hf(raw: dict, keys: dict[str, str], where: str) -> dict:
    for key, value in _FIXED.items():
        if key in raw and raw[key] != value:
            raise CheckpointError(f"{where}.{key}={raw[key]!r} is not supported (this implementation uses {value!r})")
    return {ours: raw[theirs] for theirs, ours in keys.items() if theirs in raw}


def config_from_hf(raw: dict, path: str) -> dict:
    if raw.get("model_type") not in (None, "flava"):
        raise CheckpointError(f"{path}: model_type={raw.get('model_type')!r}, expected 'flava'")
    for sub in ("image_config", "text_config", "multimodal_config"):
        if not isinstance(raw.get(sub), dict):
            raise CheckpointError(f"{path}: key {sub!r} missing or not an object")
    if raw["image_config"].get("mask_token", True) is not True:
        raise CheckpointError(f"{path}: image_config.mask_token must be true for pretraining")
    if raw["multimodal_config"].get("use_cls_token", True) is not True:
        raise CheckpointError(f"{path}: multimodal_config.use_cls_token must be true")
    mm_hidden = raw["multimodal_config"].get("hidden_size", 768)
    if raw.get("hidden_size", 768) != mm_hidden:
        raise CheckpointError(f"{path}: hidden_size={raw.get('hidden_size')} must equal multimodal_config.hidden_size")
    return {
        "image": _sub_from_hf(raw["image_config"], _IMAGE_KEYS, f"{path}: image_config"),
        "text": _sub_from_hf(raw["text_config"], _TEXT_KEYS, f"{path}: text_config"),
        "multimodal": _sub_from_hf(raw["multimodal_config"], _ENCODER_KEYS, f"{path}: multimodal_config"),
        **{ours: raw[theirs] for theirs, ours in _TOP_KEYS.items() if theirs in raw},
    }


def config_to_hf(config: FlavaConfig, codebook_config: dict | None) -> dict:
    mm = config.multimodal
    if not config.image.hidden_size == config.text.hidden_size == mm.hidden_size:
        # transformers builds the MMM heads from the unimodal configs, so it needs one width everywhere
        raise CheckpointError(
            f"transformers FLAVA needs image.hidden_size == text.hidden_size == multimodal.hidden_size, got "
            f"{config.image.hidden_size}, {config.text.hidden_size}, {mm.hidden_size}"
        )

    def sub(enc: ImageConfig | TextConfig | MultimodalConfig, keys: dict[str, str], model_type: str) -> dict:
        return {
            **{theirs: getattr(enc, ours) for theirs, ours in keys.items()},
            **_FIXED,
            "initializer_range": config.initializer_range,
            "model_type": model_type,
        }

    return {
        "model_type": "flava",
        "architectures": ["FlavaForPreTraining"],
        "image_config": {**sub(config.image, _IMAGE_KEYS, "flava_image_model"), "mask_token": True},
        "text_config": sub(config.text, _TEXT_KEYS, "flava_text_model"),
        "multimodal_config": {**sub(mm, _ENCODER_KEYS, "flava_multimodal_model"), "use_cls_token": True},
        "image_codebook_config": codebook_config or {},
        "init_codebook": codebook_config is not None,
        "hidden_size": mm.hidden_size,
        "layer_norm_eps": mm.layer_norm_eps,
        "skip_unmasked_multimodal_encoder": True,
        "return_loss": True,
        "ce_ignore_index": IGNORE_INDEX,
        **{theirs: getattr(config, ours) for theirs, ours in _TOP_KEYS.items()},
    }


# ---- directories ----------------------------------------------------------------------------------------
def load_hf_pretraining(cls: type[FlavaForPreTraining], directory: str | Path, overrides: dict) -> FlavaForPreTraining:
    raw = read_config(directory)
    config_path = str(Path(directory) / "config.json")
    values = merge_overrides(config_from_hf(raw, config_path), overrides)
    try:
        config = FlavaConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    model = cls(config)
    state = from_hf_state_dict(read_state_dict(directory), full_state_template(model), str(directory))
    model.load_full_state_dict(state)
    return model


def save_hf_pretraining(model: FlavaForPreTraining, directory: str | Path, codebook: nn.Module | None) -> None:
    codebook_config = codebook.to_hf_config() if codebook is not None else None
    state = to_hf_state_dict(model.full_state_dict())
    if codebook is not None:
        state.update({f"image_codebook.{k}": v for k, v in codebook.state_dict().items()})
    if is_global_rank_zero():
        write_checkpoint(directory, config_to_hf(model.config, codebook_config), state)

"""FLAVA model configuration: dataclasses with named presets (`FlavaConfig.preset("full" | "tiny" | ...)`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flava_ds.dataclass_config import build, merge_overrides

ATTN_IMPLS = ("sdpa", "eager", "triton")


@dataclass
class EncoderConfig:
    """A pre-norm transformer stack (ViT/BERT block layout, exact GELU)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ImageConfig(EncoderConfig):
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    codebook_vocab_size: int = 8192  # MIM / MMM-image classes = the dVAE codebook size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextConfig(EncoderConfig):
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0


@dataclass
class MultimodalConfig(EncoderConfig):
    num_layers: int = 6


@dataclass
class FlavaConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    projection_dim: int = 768
    logit_scale_init: float = 2.6592  # ln(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    initializer_range: float = 0.02
    mim_weight: float = 1.0
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    global_contrastive_weight: float = 1.0
    mmm_image_weight: float = 1.0
    mmm_text_weight: float = 1.0
    global_backprop_contrastive: bool = True  # False = CLIP-style local gradients (paper ablation)
    attn_impl: str = "sdpa"
    activation_checkpointing: bool = False
    # torch.compile each transformer block (inductor fuses the norms, GELU, residual adds and attention reshapes
    # around the matmuls): faster steady state for a one-off compile per shape; see docs/BENCHMARKS.md
    compile: bool = False

    def __post_init__(self) -> None:
        for name, cls in (("image", ImageConfig), ("text", TextConfig), ("multimodal", MultimodalConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, build(cls, value, "model", name))
        self.validate()

    def validate(self) -> None:
        """Refuse inconsistent configs before anything is allocated."""
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: choose one of {ATTN_IMPLS}")
        for name in ("image", "text", "multimodal"):
            enc: EncoderConfig = getattr(self, name)
            if enc.hidden_size % enc.num_heads:
                raise ValueError(
                    f"{name}.hidden_size={enc.hidden_size} is not divisible by {name}.num_heads={enc.num_heads}"
                )
            for key in ("hidden_size", "num_layers", "num_heads", "mlp_size"):
                if getattr(enc, key) <= 0:
                    raise ValueError(f"{name}.{key} must be positive, got {getattr(enc, key)}")
        if self.image.image_size % self.image.patch_size:
            raise ValueError(
                f"image.image_size={self.image.image_size} is not divisible by image.patch_size={self.image.patch_size}"
            )
        for key in ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text"):
            if getattr(self, f"{key}_weight") < 0:
                raise ValueError(f"{key}_weight must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FlavaConfig:
        """A named preset with overrides; nested encoder fields as dicts: `image={"num_layers": 2}`."""
        if name not in PRESETS:
            raise ValueError(f"unknown FLAVA preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(merge_overrides(PRESETS[name], overrides))

    @classmethod
    def from_dict(cls, values: dict[str, Any], doc: str = "model", key: str = "") -> FlavaConfig:
        """Every value converted to its declared type; a bad key or value is named at `doc.key` (see `build`)."""
        return build(cls, values, doc, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_for_tensor_parallel(config: FlavaConfig, tensor_parallel_size: int) -> None:
    """Refuse a TP size the encoders cannot be split by (attention heads and MLP features go to TP ranks)."""
    for name in ("image", "text", "multimodal"):
        enc: EncoderConfig = getattr(config, name)
        for key in ("hidden_size", "num_heads", "mlp_size"):
            if getattr(enc, key) % tensor_parallel_size:
                raise ValueError(
                    f"{name}.{key}={getattr(enc, key)} is not divisible by tensor_parallel_size={tensor_parallel_size}"
                )


def _encoder(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "mlp_size": 4 * hidden, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model (docs/DESIGN.md §3): ViT-B/16 image encoder, BERT-base-sized text encoder, 6-layer fusion.
    "full": {},
    # Unit tests: seconds on a CPU.
    "tiny": {
        "image": _encoder(32, 2, 2, image_size=64, codebook_vocab_size=64),
        "text": _encoder(32, 2, 2, vocab_size=512, max_position_embeddings=80),
        "multimodal": _encoder(32, 1, 2),
        "projection_dim": 32,
    },
    # The CPU demo: small enough for a few hundred steps in minutes on 2 cores.
    "small": {
        "image": _encoder(128, 4, 4, image_size=64, codebook_vocab_size=64),
        "text": _encoder(128, 4, 4, vocab_size=2048, max_position_embeddings=80),
        "multimodal": _encoder(128, 2, 4),
        "projection_dim": 128,
    },
    # A scaling configuration beyond FLAVA-full (TorchMultimodal-style), meant for tensor parallelism.
    "large": {
        "image": _encoder(1024, 24, 16),
        "text": _encoder(1024, 24, 16),
        "multimodal": _encoder(1024, 12, 16),
        "projection_dim": 1024,
    },
}

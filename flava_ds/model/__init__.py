"""FLAVA model: config presets, encoders, heads, losses, dVAE codebook and `transformers` interop."""

from flava_ds.model.codebook import CodebookConfig, FlavaCodebook, load_codebook
from flava_ds.model.config import EncoderConfig, FlavaConfig, ImageConfig, MultimodalConfig, TextConfig
from flava_ds.model.flava import FlavaForPreTraining, FlavaOutput
from flava_ds.model.hf_io import CheckpointError
from flava_ds.model.objectives import LOSS_NAMES

__all__ = [
    "LOSS_NAMES",
    "CheckpointError",
    "CodebookConfig",
    "EncoderConfig",
    "FlavaCodebook",
    "FlavaConfig",
    "FlavaForPreTraining",
    "FlavaOutput",
    "ImageConfig",
    "MultimodalConfig",
    "TextConfig",
    "load_codebook",
]

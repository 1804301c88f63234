"""Start-up check of the data against the model and the run config, before anything heavy is built.

Every stream the run reads (data.image_text / data.image / data.text with a positive kind ratio, and the
eval.* shard paths) is compared through its manifests alone, so the check costs milliseconds however
large the data: caption max length vs the text encoder's positions, tokenizer (fingerprint of
data.tokenizer, computed like the preprocessors do; its vocabulary vs text.vocab_size), codebook size vs
image.codebook_vocab_size, stored image size vs the crop the loader takes (image.image_size), and
data.text_max_length vs text.max_position_embeddings. A manifest that predates a field (older shards) skips
that comparison. The readers check the files themselves when they open them (sizes, Arrow offsets, `.idx`
pointers; `ShardError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flava_ds.data.image_dataset import PATCH, codebook_size
from flava_ds.data.text_dataset import merged_manifest, resolve_prefixes
from flava_ds.data.tokenizer import Tokenizer
from flava_ds.model import FlavaConfig
from flava_ds.shard_format import ShardError, read_manifests
from flava_ds.train.config import ConfigError, RunConfig

CAPTIONS, IMAGES, CLASSIFICATION, TEXT = "image_text", "image", "classification", "text"


def check_data(config: RunConfig, model_config: FlavaConfig) -> None:
    """Raise `ConfigError` naming the file and the field when a stream's data cannot fit the model."""
    sources = _sources(config)
    kinds = {kind for _, kind, _ in sources}
    positions = model_config.text.max_position_embeddings
    if TEXT in kinds and config.data.text_max_length > positions:
        raise ConfigError(
            f"data.text_max_length={config.data.text_max_length} exceeds the model's text.max_position_embeddings="
            f"{positions}; lower data.text_max_length or raise model.overrides.text.max_position_embeddings"
        )
    if kinds & {IMAGES, CAPTIONS, CLASSIFICATION} and model_config.image.patch_size != PATCH:
        raise ConfigError(
            f"model image.patch_size={model_config.image.patch_size}, but the shards store one codebook token per "
            f"{PATCH} px patch; set model.overrides.image.patch_size: {PATCH}"
        )
    tokenizer = _tokenizer(config, model_config) if kinds & {CAPTIONS, TEXT} else None
    for key, kind, path in sources:
        try:
            manifests = _text_manifests(path) if kind == TEXT else _arrow_manifests(path)
        except (ShardError, FileNotFoundError) as err:
            raise ConfigError(f"{key}: {err}") from None
        for manifest_path, manifest in manifests:
            _check_manifest(Path(manifest_path), manifest, kind, tokenizer, model_config)


def _sources(config: RunConfig) -> list[tuple[str, str, str]]:
    """(config key, kind, path) of every shard path the run reads."""
    active = config.data.active_ratios()
    sources = [
        (f"data.{kind}.paths", kind, path)
        for kind in (CAPTIONS, IMAGES, TEXT)
        if kind in active
        for path in getattr(config.data, kind).paths
    ]
    for key, kind in ((CAPTIONS, CAPTIONS), ("classification", CLASSIFICATION), ("text", TEXT)):
        sources += [(f"eval.{key}", kind, path) for path in getattr(config.eval, key)]
    return sources


def _tokenizer(config: RunConfig, model_config: FlavaConfig) -> Tokenizer:
    """data.tokenizer, loaded and checked to fit the text embedding."""
    if not config.data.tokenizer:
        raise ConfigError("data.tokenizer is not set; text streams need the tokenizer their shards were made with")
    try:
        tokenizer = Tokenizer.from_file(config.data.tokenizer)
    except ValueError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None
    if tokenizer.vocab_size > model_config.text.vocab_size:
        raise ConfigError(
            f"data.tokenizer {tokenizer.path}: vocab_size={tokenizer.vocab_size} exceeds the model's text.vocab_size="
            f"{model_config.text.vocab_size}; set model.overrides.text.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def _arrow_manifests(path: str) -> list[tuple[str, dict[str, Any]]]:
    return [(m["_path"], m) for m in read_manifests(Path(path))]


def _text_manifests(path: str) -> list[tuple[Path, dict[str, Any]]]:
    """The manifest of each merged dataset under `path` (bare prefixes without one have nothing to compare)."""
    return [found for prefix in resolve_prefixes(path) if (found := merged_manifest(prefix))]


def _check_manifest(
    path: Path, manifest: dict[str, Any], kind: str, tokenizer: Tokenizer | None, model: FlavaConfig
) -> None:
    """One manifest against the model and the run's tokenizer: the comparisons its stream kind needs."""
    args, fingerprints = manifest.get("args", {}), manifest.get("fingerprints", {})
    if kind in (CAPTIONS, TEXT):
        recorded = fingerprints.get("tokenizer")
        if recorded is not None and recorded != tokenizer.fingerprint:
            raise ConfigError(
                f"{path}: fingerprints.tokenizer={recorded} (made with {args.get('tokenizer', '?')}), but "
                f"data.tokenizer {tokenizer.path} is {tokenizer.fingerprint}; point data.tokenizer at the tokenizer "
                "these shards were made with, or re-run the preprocessing with data.tokenizer"
            )
    if kind == CAPTIONS:
        max_length, positions = args.get("max_length"), model.text.max_position_embeddings
        if max_length is not None and max_length > positions:
            raise ConfigError(
                f"{path}: args.max_length={max_length} (captions up to {max_length} tokens) exceeds the model's "
                f"text.max_position_embeddings={positions}; re-run preprocess.pairs with --max-length {positions} "
                "or raise model.overrides.text.max_position_embeddings"
            )
    if kind in (CAPTIONS, IMAGES):
        codes, classes = codebook_size(args.get("codebook")), model.image.codebook_vocab_size
        if codes is not None and codes != classes:
            raise ConfigError(
                f"{path}: args.codebook={args['codebook']} has {codes} codes, but the model's image.codebook_vocab_size"
                f"={classes}; set model.overrides.image.codebook_vocab_size: {codes}, or re-run the preprocessing with "
                f"a {classes}-code codebook"
            )
    if kind in (CAPTIONS, IMAGES, CLASSIFICATION):
        stored, crop = args.get("image_size"), model.image.image_size
        if stored is not None and stored < crop:
            raise ConfigError(
                f"{path}: args.image_size={stored} px is smaller than the {crop} px crop the loader takes for the "
                f"model's image.image_size; re-run the preprocessing with --image-size >= {crop} or lower "
                "model.overrides.image.image_size"
            )

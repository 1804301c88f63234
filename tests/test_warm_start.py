"""Initialising from existing weights: the whole model, a transformers ViT as the image encoder (the paper's
unimodal init), and the text encoder from another run's export."""

from __future__ import annotations

import pytest
import torch
import transformers

from flava_ds.model import CheckpointError, FlavaConfig, FlavaForPreTraining
from flava_ds.train.config import InitConfig
from flava_ds.train.warm_start import initialize_from_checkpoints


def _model(seed: int) -> FlavaForPreTraining:
    torch.manual_seed(seed)
    return FlavaForPreTraining(FlavaConfig.preset("tiny"))


def test_image_encoder_from_a_transformers_vit_computes_the_same_features(tmp_path):
    img = FlavaConfig.preset("tiny").image
    vit_config = transformers.ViTConfig(
        hidden_size=img.hidden_size,
        num_hidden_layers=img.num_layers,
        num_attention_heads=img.num_heads,
        intermediate_size=img.mlp_size,
        image_size=img.image_size,
        patch_size=img.patch_size,
        layer_norm_eps=img.layer_norm_eps,
        hidden_act="gelu",
    )
    torch.manual_seed(1)
    vit = transformers.ViTForImageClassification(vit_config).eval()  # keys under "vit.", plus a classifier
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    vit.save_pretrained(tmp_path)
    model = _model(0).eval()
    text_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("text_encoder.")}
    initialize_from_checkpoints(model, InitConfig(image_encoder=str(tmp_path)))

    pixels = torch.randn(2, 3, img.image_size, img.image_size)
    with torch.no_grad():
        ours = model.image_encoder(pixels)[1]
        theirs = vit.vit(pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in text_before.items())  # text untouched


def test_whole_model_and_text_encoder_from_exports(tmp_path):
    source = _model(1)
    source.save_pretrained(tmp_path / "export")
    whole = _model(2)
    initialize_from_checkpoints(whole, InitConfig(model=str(tmp_path / "export")))
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in source.state_dict().items())

    text_only = _model(3)
    image_before = text_only.image_encoder.patch_embed.weight.clone()
    initialize_from_checkpoints(text_only, InitConfig(text_encoder=str(tmp_path / "export")))
    for name, value in source.state_dict().items():
        if name.startswith("text_encoder."):
            assert torch.equal(text_only.state_dict()[name], value), name
    assert torch.equal(text_only.image_encoder.patch_embed.weight, image_before)


def test_mismatched_init_checkpoint_names_the_problem(tmp_path):
    bigger = FlavaForPreTraining(FlavaConfig.preset("tiny", text={"hidden_size": 48, "num_heads": 2, "mlp_size": 96}))
    bigger.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"text_encoder\.\S+ has shape"):
        initialize_from_checkpoints(_model(0), InitConfig(text_encoder=str(tmp_path)))
    with pytest.raises(CheckpointError, match="is not a directory"):
        initialize_from_checkpoints(_model(0), InitConfig(model=str(tmp_path / "missing")))

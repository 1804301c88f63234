"""Checkpoint interop: round trips, the command-line converter and mismatched directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from flava_ds.model import CheckpointError, FlavaCodebook, FlavaConfig, FlavaForPreTraining, load_codebook
from tests.model_inputs import make_batches

ROOT = Path(__file__).resolve().parents[1]


def _random_model(seed: int = 0) -> FlavaForPreTraining:
    torch.manual_seed(seed)
    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        model.logit_scale.abs_()  # in [0, ln 100]: transformers clamps it only in training, we always do
    return model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_through_transformers_dir_is_bit_exact(tmp_path):
    model = _random_model()
    model.save_hf_pretrained(tmp_path / "hf")
    # transformers itself loads and re-saves it: still bit-exact when it comes back
    theirs = transformers.FlavaForPreTraining.from_pretrained(tmp_path / "hf")
    theirs.save_pretrained(tmp_path / "hf2")
    back = FlavaForPreTraining.from_hf_pretrained(tmp_path / "hf2")
    _assert_same_state(model, back)
    assert back.config == model.config


def test_codebook_included_in_transformers_dir(tmp_path):
    model, codebook = _random_model(), load_codebook("random:3:tiny")
    model.save_hf_pretrained(tmp_path, codebook=codebook)
    theirs, info = transformers.FlavaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(
        theirs.image_codebook.get_codebook_indices(pixels * 0.8 + 0.1), codebook.get_codebook_indices(pixels)
    )
    _assert_same_state(model, FlavaForPreTraining.from_hf_pretrained(tmp_path))  # codebook keys ignored


def test_codebook_round_trip(tmp_path):
    codebook = load_codebook("random:1:tiny")
    codebook.save_hf_pretrained(tmp_path)
    _theirs, info = transformers.FlavaImageCodebook.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_state(codebook, FlavaCodebook.from_hf_pretrained(tmp_path))


def test_convert_cli_both_directions(tmp_path):
    model = _random_model(1)
    model.save_pretrained(tmp_path / "ours")
    run = lambda *a: subprocess.run(
        [sys.executable, str(ROOT / "tools/convert_checkpoint.py"), *a], check=True, capture_output=True, text=True
    )
    run("to-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf"), "--codebook", "random:0:tiny")
    run("from-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back"))
    _assert_same_state(model, FlavaForPreTraining.from_pretrained(tmp_path / "back"))
    theirs = transformers.FlavaForPreTraining.from_pretrained(tmp_path / "hf").eval()
    batch = make_batches(model.config, seed=2)["image_text"]
    torch.testing.assert_close(model.eval()(**batch).loss, theirs(**batch).loss, atol=1e-5, rtol=1e-5)


def test_config_that_does_not_match_weights_names_the_key(tmp_path):
    _random_model().save_hf_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["vocab_size"] = 999
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="word_embeddings"):
        FlavaForPreTraining.from_hf_pretrained(tmp_path)


def test_unsupported_config_value_names_the_key(tmp_path):
    _random_model().save_hf_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["image_config"]["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"image_config\.hidden_act"):
        FlavaForPreTraining.from_hf_pretrained(tmp_path)


def test_missing_weights_are_named(tmp_path):
    model = _random_model()
    model.save_hf_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["itm_head.seq_relationship.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"itm_head\.seq_relationship\.weight"):
        FlavaForPreTraining.from_hf_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    """A legacy .bin carrying an arbitrary pickle is refused, not executed."""
    _random_model().save_hf_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        FlavaForPreTraining.from_hf_pretrained(tmp_path)

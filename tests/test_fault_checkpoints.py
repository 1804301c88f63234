"""Untrusted checkpoints: a pickle payload in a DeepSpeed checkpoint, a `latest` naming a glob, and pickled
weights on every other load path are refused, and the payload never runs. What each test proves is listed in
docs/RELIABILITY.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flava_ds.train.checkpoint import UntrustedCheckpointError, check_pickles, export, read_latest
from tests.fault_helpers import Payload, fault_config
from tests.launch import ROOT, launch_pretrain


def test_tampered_deepspeed_checkpoint_is_refused_unexecuted(reference_run, tmp_path):
    """DeepSpeed unpickles its files with weights_only=False; a model-states file carrying a payload is refused
    before that (resume and export), the payload never runs, and genuine checkpoints pass."""
    _, ckpt = reference_run
    check_pickles(ckpt / read_latest(ckpt))
    tampered = tmp_path / "ckpt"
    shutil.copytree(ckpt, tampered)
    marker = tmp_path / "pwned"
    state = torch.load(tampered / read_latest(tampered) / "mp_rank_00_model_states.pt", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, tampered / read_latest(tampered) / "mp_rank_00_model_states.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"posix\.mkdir"):
        export(tampered, tmp_path / "export")
    from flava_ds.train import checkpoint

    with pytest.raises(UntrustedCheckpointError, match=r"mp_rank_00_model_states\.pt"):
        checkpoint.load(None, tampered)  # what the trainer calls on --load, before DeepSpeed sees the files
    assert not marker.exists()


def test_latest_naming_a_glob_is_refused_and_its_payload_never_runs(
    reference_run, training_data, zero2_config, tmp_path
):
    """A `latest` holding `evi[l]` used to pass the scan (no literal `evi[l]/`) while DeepSpeed globbed the files
    of `evil/`: resume (`--load`) and `convert_checkpoint.py from-deepspeed` both refuse it, and nothing runs."""
    _, ckpt = reference_run
    crafted = tmp_path / "ckpt"
    shutil.copytree(ckpt, crafted)
    marker = tmp_path / "pwned"
    evil = crafted / "evil"
    shutil.copytree(crafted / read_latest(crafted), evil)
    state = torch.load(evil / "mp_rank_00_model_states.pt", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, evil / "mp_rank_00_model_states.pt")
    (crafted / "latest").write_text("evi[l]")
    config = fault_config(tmp_path, training_data)
    result = launch_pretrain(
        2, "--deepspeed_config", str(zero2_config), "--config", str(config), "--load", str(crafted)
    )
    assert result.returncode != 0
    assert "checkpoint refused" in result.stderr and "'evi[l]'" in result.stderr, result.stderr[-3000:]
    assert "is not global_step<N>" in result.stderr
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "from-deepspeed"]
    result = subprocess.run([*tool, "--input", str(crafted), "--output", str(tmp_path / "export")],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode != 0 and "is not global_step<N>" in result.stderr, result.stderr[-3000:]
    assert not marker.exists(), "the payload ran"


def test_pickled_weights_are_refused_on_every_load_path(tmp_path):
    """Every weights reader outside DeepSpeed (our export, whole-model / image / text init, the codebook, a
    sharded index) refuses a pickle payload instead of running it."""
    from flava_ds.model import CheckpointError, FlavaConfig, FlavaForPreTraining, load_codebook
    from flava_ds.train.config import InitConfig
    from flava_ds.train.warm_start import initialize_from_checkpoints

    marker = tmp_path / "pwned"

    def poison(directory: Path) -> Path:
        for weights in directory.glob("model.safetensors*"):
            weights.unlink()
        torch.save({"weight": Payload(marker)}, directory / "pytorch_model.bin")
        return directory

    model = FlavaForPreTraining(FlavaConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "export")
    export_dir = poison(tmp_path / "export")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    poison(vit)
    load_codebook("random:0:tiny").save_hf_pretrained(tmp_path / "codebook")
    codebook = poison(tmp_path / "codebook")

    loads = {
        "from_pretrained": lambda: FlavaForPreTraining.from_pretrained(export_dir),
        "init.model": lambda: initialize_from_checkpoints(model, InitConfig(model=str(export_dir))),
        "init.text_encoder": lambda: initialize_from_checkpoints(model, InitConfig(text_encoder=str(export_dir))),
        "init.image_encoder": lambda: initialize_from_checkpoints(model, InitConfig(image_encoder=str(vit))),
        "codebook": lambda: load_codebook(str(codebook)),
    }
    for name, load in loads.items():
        with pytest.raises(CheckpointError, match="refused"):
            load()
        assert not marker.exists(), name

    (export_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    with pytest.raises(Exception, match="header"):  # safetensors parses, never unpickles
        FlavaForPreTraining.from_pretrained(export_dir)
    assert not marker.exists()

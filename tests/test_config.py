"""Run-config values are read as their declared types, and every mistake is one message before the model is built."""

from __future__ import annotations

import pytest

from flava_ds.train.config import ConfigError, RunConfig, model_config_of
from tests.train_fixtures import make_training_data, pretrain_refusal, write_ds_config, write_run_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("config_data"), num_pairs=8, num_docs=4)


def test_values_take_their_declared_types():
    """YAML 1.1 reads `1e-3` as a string; the float field takes it as a number (AdamW crashed on the string)."""
    config = RunConfig.load(
        None,
        [
            ("optimizer.lr", "1e-3"),
            ("train.steps", "1e4"),
            ("optimizer.betas", "[0.9, 0.95]"),
            ("data.text.paths", "shards/text"),
            ("model.overrides", "{mlm_weight: 5e-1, text: {num_layers: 2}}"),
        ],
    )
    assert config.optimizer.lr == 1e-3 and isinstance(config.optimizer.lr, float)
    assert config.train.steps == 10000 and isinstance(config.train.steps, int)
    assert config.optimizer.betas == (0.9, 0.95)
    assert config.data.text.paths == ["shards/text"]
    model = model_config_of(config)
    assert model.mlm_weight == 0.5 and model.text.num_layers == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("train.steps", "five"), "train.steps: expected an integer, got 'five'"),
        (("optimizer.lr", "-1e-3"), "optimizer.lr: -0.001 is outside (0.0, inf]"),
        (("model.preset", "fulll"), "model.preset: unknown preset 'fulll'"),
        (("data.mlm_prob", "1.5"), "data.mlm_prob: 1.5 is outside (0.0, 1.0)"),
        (("data.verify_checksums", "maybe"), "data.verify_checksums: expected true or false"),
        (("model.overrides", "{text: {vocab_size: 7.5}}"), "model.overrides.text.vocab_size: expected an integer"),
        (("model.overrides", "{attn_impl: flash}"), "attn_impl='flash'"),
        (("optimizer.betas", "[0.9, 1.5]"), "optimizer.betas: [0.9, 1.5] must each be in [0, 1)"),
        (("train.log_interval", "{a: [1"), "--train.log_interval '{a: [1': not a YAML value"),
        (("deepspeed.train_micro_batch_size_per_gpu", "two"), "deepspeed.train_micro_batch_size_per_gpu: expected"),
    ],
)
def test_config_mistakes_are_one_message_before_the_model_is_built(data, tmp_path, override, message):
    config = write_run_config(tmp_path / "run.yaml", data)
    ds = write_ds_config(tmp_path / "ds.json", 0)
    text = pretrain_refusal(["--deepspeed_config", str(ds), "--config", str(config), f"--{override[0]}", override[1]])
    assert text.startswith("flava_ds: configuration error: ") and "\n" not in text, text
    assert message in text, text


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        RunConfig.load(path)


def test_the_old_name_of_the_kind_ratios_still_reads():
    """Run YAMLs and checkpoints' run_config.json written before the rename keep loading."""
    old = ("data.task_ratios", "{text: 1.0, image: 0.5}")
    assert RunConfig.load(None, [old]).data.kind_ratios == {"text": 1.0, "image": 0.5}
    with pytest.raises(ConfigError, match=r"task_ratios .* and kind_ratios both given"):
        RunConfig.load(None, [old, ("data.kind_ratios", "{text: 1.0}")])

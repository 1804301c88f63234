"""Shared pytest setup: quiet third-party warnings, and what several modules read, built once a session: the
training data, and the fault tests' ZeRO-2 config and uninterrupted reference run."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`make_training_data`'s default setup. Tests only read it: one that damages shards copies them first."""
    from tests.train_fixtures import make_training_data

    return make_training_data(tmp_path_factory.mktemp("training_data"))


@pytest.fixture(scope="session")
def zero2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DeepSpeed config of the fault tests' runs: ZeRO-2, micro batch 2, fp32."""
    from tests.train_fixtures import write_ds_config

    return write_ds_config(tmp_path_factory.mktemp("fault_ds") / "zero2.json", 2)


@pytest.fixture(scope="session")
def reference_run(
    training_data: dict[str, Path], zero2_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[int, float], Path]:
    """An uninterrupted 2-rank STEPS-step run: its per-step losses and its checkpoint directory."""
    from tests.fault_helpers import STEPS, Run, ended_cleanly, fault_config
    from tests.train_fixtures import step_losses

    tmp = tmp_path_factory.mktemp("reference")
    metrics = tmp / "metrics.jsonl"
    args = ["--deepspeed_config", str(zero2_config), "--config", str(fault_config(tmp, training_data))]
    run = Run(2, tmp / "run.log", *args, "--save", str(tmp / "ckpt"), "--logging.metrics_file", str(metrics))
    run.wait()
    assert ended_cleanly(run, STEPS), run.tail()
    losses = step_losses(metrics)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, tmp / "ckpt"

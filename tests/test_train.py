"""`deepspeed --num_gpus 2 flava_ds/pretrain.py` on CPU ranks: ZeRO stages agree, exact resume, TensorBoard,
export, and bad configs refused before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flava_ds.model import FlavaForPreTraining
from flava_ds.train.checkpoint import export, read_latest
from tests.launch import launch_pretrain
from tests.train_fixtures import finished, pretrain_refusal, step_losses, write_ds_config, write_run_config


def _train(
    data,
    tmp: Path,
    stage: int,
    steps: int,
    *extra: str,
    ds_name: str = "ds.json",
    stopped_early=False,
    accum: int = 1,
    env: dict | None = None,
    **sections,
):
    tmp.mkdir(parents=True, exist_ok=True)
    metrics = tmp / "metrics.jsonl"
    # a CPU has no entry in the peak-FLOP/s table: give one so MFU is logged
    config = write_run_config(
        tmp / "run.yaml", data, logging={"metrics_file": str(metrics), "peak_tflops": 1.0}, **sections
    )
    ds = write_ds_config(tmp / ds_name, stage, micro=2 // accum, accum=accum)
    result = launch_pretrain(
        2, "--deepspeed_config", str(ds), "--config", str(config), "--train-steps", str(steps), *extra, env=env
    )
    assert finished(result, 2, stopped_early), result.stdout[-4000:] + result.stderr[-4000:]
    return step_losses(metrics), result


def test_zero_stages_agree(training_data, tmp_path):
    """fp32 losses of the first 5 steps (mixed batch kinds) agree across ZeRO 0, 1, 2 and 3, and so do the weights
    each stage's checkpoint exports (ZeRO-0 has no optimizer partitions, ZeRO-1 leaves out the frozen poolers)."""
    runs = {
        stage: _train(training_data, tmp_path / f"z{stage}", stage, 5, "--save", str(tmp_path / f"ck{stage}"))[0]
        for stage in (0, 1, 2, 3)
    }
    exported = {
        stage: FlavaForPreTraining.from_pretrained(
            export(tmp_path / f"ck{stage}", tmp_path / f"ex{stage}")
        ).state_dict()
        for stage in (0, 1, 2, 3)
    }
    for stage in (1, 2, 3):
        for name, weight in exported[0].items():
            torch.testing.assert_close(exported[stage][name], weight, rtol=1e-4, atol=1e-5, msg=f"ZeRO-{stage} {name}")
    assert sorted(runs[0]) == [1, 2, 3, 4, 5]
    for stage in (1, 2, 3):
        for step, loss in runs[0].items():
            assert abs(runs[stage][step] - loss) < 1e-4, (stage, step, runs[stage][step], loss)
    assert len(set(round(v, 3) for v in runs[0].values())) == 5  # the steps really differ (mixed kinds, updates)


def test_every_micro_step_of_an_optimizer_step_trains_the_same_batch_kind(training_data, tmp_path):
    """Under accumulation a step is one batch kind (the paper's one dataset per iteration), drawn from (seed, step):
    accumulation does not change which kinds a step mixes."""
    import json

    from flava_ds.data.sampler import KindMixer
    from flava_ds.train.config import DataSection

    logs = tmp_path / "samples"
    _train(training_data, tmp_path / "run", 1, 6, accum=2, env={"FLAVA_DS_SAMPLE_LOG": str(logs)})
    mixer = KindMixer({"image_text": 2.0, "image": 1.0, "text": 1.0}, seed=DataSection().seed)
    expected = [mixer.kind_for_step(s) for s in range(6)]
    assert len(set(expected)) > 1
    for rank in (0, 1):
        records = [json.loads(line) for line in (logs / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [(r["step"], r["micro"]) for r in records] == [(s, m) for s in range(1, 7) for m in (0, 1)]
        assert [r["kind"] for r in records] == [kind for kind in expected for _ in (0, 1)]


def test_exact_resume_and_tensorboard(training_data, tmp_path):
    tb, wandb_dir = tmp_path / "tb", tmp_path / "wandb"
    wandb = f"{{project: flava_ds_test, mode: offline, dir: {wandb_dir}}}"
    straight, result = _train(
        training_data,
        tmp_path / "straight",
        2,
        10,
        *("--save", str(tmp_path / "ck_straight"), "--tensorboard-dir", str(tb), "--logging.wandb", wandb),
    )
    console = [line for line in (result.stdout + result.stderr).splitlines() if "step 10/10 |" in line]
    assert console and all(
        word in console[0] for word in ("elapsed", "ETA 0s", "40 samples", "| epoch ", " image_text 0.")
    )
    first, _ = _train(
        training_data,
        tmp_path / "first",
        2,
        10,
        "--save",
        str(tmp_path / "ck_resume"),
        "--train.exit_at_step",
        "5",
        stopped_early=True,
    )
    assert read_latest(tmp_path / "ck_resume") == "global_step5"
    resume = ("--save", str(tmp_path / "ck_resume"), "--load", str(tmp_path / "ck_resume"))
    second, result = _train(training_data, tmp_path / "second", 2, 10, *resume)
    assert "resumed from" in result.stderr + result.stdout
    assert sorted(second) == list(range(6, 11))
    resumed = {**first, **second}
    assert resumed == straight  # identical per-step losses, bit for bit

    a = export(tmp_path / "ck_straight", tmp_path / "export_a")
    b = export(tmp_path / "ck_resume", tmp_path / "export_b")
    sa, sb = FlavaForPreTraining.from_pretrained(a).state_dict(), FlavaForPreTraining.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    _check_tensorboard(tb)
    _check_wandb(wandb_dir)


def _check_wandb(directory: Path) -> None:
    """wandb's offline run (its own binary records; wandb 0.31 ships no reader) holds every scalar's name."""
    (run,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    records = run.read_bytes()
    for name in ("loss/total", "loss/image_text/global_contrastive", "loss/text/mlm", "data/epoch/image_text", "lr"):
        assert name.encode() in records, name


def _check_tensorboard(tb: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "loss/total",
        "lr",
        "grad_norm",
        "logit_scale",
        "throughput/samples_per_s",
        "throughput/tokens_per_s",
        "throughput/tflops_per_device",
        "throughput/mfu",
        "throughput/data_wait_fraction",
        "memory/peak_mib",
        "loss/image_text/total",
        "loss/image_text/global_contrastive",
        "loss/image_text/itm",
        "loss/image_text/mmm_image",
        "loss/image_text/mmm_text",
        "loss/image/mim",
        "loss/text/mlm",
    }
    assert expected <= tags, expected - tags
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == list(range(1, 11))
    assert all(0 < e.value < 1 for e in events.Scalars("throughput/data_wait_fraction"))


def _main(tmp_path, fixture_data, **sections) -> str:
    """Run pretrain.main in-process with a bad config; return its one-line error."""
    config = write_run_config(tmp_path / "bad.yaml", fixture_data, **sections)
    ds = write_ds_config(tmp_path / "ds.json", 2, micro=2, accum=2)
    return pretrain_refusal(["--deepspeed_config", str(ds), "--config", str(config)])


def test_bad_configs_fail_before_the_model_is_built(training_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = _main(tmp_path, training_data, train={"global_batch_size": 16})
    assert "micro batch 2 x accumulation 2 x data-parallel size 2 = 8" in message
    message = _main(tmp_path, training_data, train={"stepz": 3})
    assert "config.train: unknown key(s) ['stepz']" in message
    message = _main(tmp_path, training_data, data={"image": {"paths": [str(tmp_path / "nope")]}})
    assert f"data.image.paths: {tmp_path / 'nope'} does not exist" in message
    message = _main(tmp_path, training_data, data={"text": {"paths": []}, "kind_ratios": {"text": 1.0}})
    assert "data.kind_ratios.text=1.0 but data.text.paths is empty" in message
    message = _main(tmp_path, training_data, logging={"wandb": {"project": "p", "mode": "ofline"}})
    assert "logging.wandb.mode='ofline'" in message


def test_run_config_overrides(tmp_path, training_data):
    from flava_ds.train.config import RunConfig

    path = write_run_config(tmp_path / "run.yaml", training_data)
    config = RunConfig.load(
        path, [("train.log_interval", "7"), ("data.kind_ratios", "{image: 1}"), ("deepspeed.bf16.enabled", "false")]
    )
    assert config.train.log_interval == 7 and config.data.kind_ratios == {"image": 1}
    assert config.deepspeed == {"bf16": {"enabled": False}}
    assert yaml.safe_load(path.read_text())["model"]["preset"] == "tiny"


def test_tensor_parallel_training_matches_single_process(training_data, tmp_path):
    """pretrain.py with --tensor-model-parallel-size 2 (2 ranks, DP = 1) follows the 1-process run, ZeRO-1."""
    config = write_run_config(tmp_path / "run.yaml", training_data)
    ds = write_ds_config(tmp_path / "ds.json", 1)
    losses = {}
    for tp in (1, 2):
        metrics = tmp_path / f"tp{tp}.jsonl"
        result = launch_pretrain(
            tp,
            "--deepspeed_config",
            str(ds),
            "--config",
            str(config),
            "--train-steps",
            "4",
            "--tensor-model-parallel-size",
            str(tp),
            "--logging.metrics_file",
            str(metrics),
        )
        assert finished(result, tp), result.stdout[-3000:] + result.stderr[-3000:]
        losses[tp] = step_losses(metrics)
    assert sorted(losses[1]) == [1, 2, 3, 4]
    for step, loss in losses[1].items():
        assert abs(losses[2][step] - loss) < 1e-4, (step, losses[2][step], loss)


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
)
def test_shipped_run_configs_parse_and_build(name):
    """Every shipped run YAML parses into a valid config whose model builds (on the meta device)."""
    from flava_ds.model import FlavaConfig
    from flava_ds.train.config import RunConfig

    config = RunConfig.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert any(r > 0 for r in config.data.kind_ratios.values())
    with torch.device("meta"):
        FlavaForPreTraining(FlavaConfig.preset(config.model.preset, **config.model.overrides))

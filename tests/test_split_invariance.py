"""A training step is a function of the global batch alone: the same global batches give the same losses and the
same update on any cluster shape (data-parallel ranks x micro batch x accumulation), and a checkpoint resumes on
another shape with the uninterrupted run's losses. Every masked-token and per-pair loss is a mean over the whole
global batch of a step, the contrastive term scores against the whole global batch under accumulation (the
cache), and ZeRO partitions move through DeepSpeed's universal checkpoint. Real `deepspeed` launches on gloo CPU
ranks, tiny preset; one run per shape trains the mix, whose steps are 3 of each batch kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from flava_ds.train.checkpoint import publish_latest, tag_for
from tests.launch import ROOT, launch_pretrain
from tests.train_fixtures import finished, write_ds_config, write_run_config

GLOBAL_BATCH = 16
RTOL = 1e-5
# data.seed 70 draws image_text, text, image, image_text, text, image_text, image, text, image: every kind
# three times in the first 9 steps, the first step image-text
SEED = 70
KINDS = ("image_text", "image", "text")
# (data-parallel ranks, micro batch, accumulation steps), all GLOBAL_BATCH samples per step
SHAPES = [(1, 16, 1), (2, 8, 1), (4, 4, 1), (1, 4, 4), (2, 4, 2)]


def _config(data, tmp: Path, **train) -> Path:
    return write_run_config(
        tmp / "run.yaml",
        data,
        data={"kind_ratios": {kind: 1.0 for kind in KINDS}, "seed": SEED},
        logging={"metrics_file": str(tmp / "metrics.jsonl")},
        train=train,
    )


def _losses(metrics: Path) -> dict[int, dict[str, float]]:
    """Per step: the step's loss and every logged loss term (loss/<kind>/<term>, loss/total)."""
    steps: dict[int, dict[str, float]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        terms = steps.setdefault(record["step"], {})
        if "loss" in record:
            terms["loss"] = record["loss"]
        terms.update({k: v for k, v in record.get("log", {}).items() if k.startswith("loss/")})
    return steps


def _train(tmp: Path, config: Path, stage: int, ranks: int, micro: int, accum: int, *args: str) -> None:
    assert ranks * micro * accum == GLOBAL_BATCH
    ds = write_ds_config(tmp / "ds.json", stage, micro=micro, accum=accum)
    result = launch_pretrain(ranks, "--deepspeed_config", str(ds), "--config", str(config), *args)
    assert finished(result, ranks), result.stdout[-3000:] + result.stderr[-3000:]


def _assert_same_losses(reference: dict, other: dict, label: str) -> None:
    assert sorted(other) == sorted(reference), label
    for step, terms in reference.items():
        assert sorted(other[step]) == sorted(terms), (label, step)
        for name, value in terms.items():
            assert abs(other[step][name] - value) <= RTOL * abs(value), f"{label}: {name} at step {step}"


def _assert_same_weights(reference: dict, weights: dict, label: str) -> None:
    assert sorted(weights) == sorted(reference), label
    # over the whole model: the attention key bias gets a gradient of pure roundoff (softmax ignores it), which
    # Adam turns into lr-sized steps of either sign, so that one tensor differs by noise on any two machines
    diff = sum((weights[k].double() - v.double()).square().sum() for k, v in reference.items()).sqrt().item()
    norm = sum(v.double().square().sum() for v in reference.values()).sqrt().item()
    assert diff <= RTOL * norm, f"{label}: weights differ by {diff} (norm {norm})"


def test_every_shape_of_the_global_batch_trains_the_same(training_data, tmp_path):
    """1 x 16, 2 x 8, 4 x 4, 1 x 4 x 4 and 2 x 4 x 2 (ranks x micro x accumulation): each step's loss, every
    logged loss term of each batch kind and the final fp32 weights agree to 1e-5 relative over 9 steps, 3 of
    each kind (image-text under accumulation through the contrastive cache)."""
    runs = {}
    for shape in SHAPES:
        tmp = tmp_path / "x".join(map(str, shape))
        tmp.mkdir()
        _train(tmp, _config(training_data, tmp, steps=9), 1, *shape, "--save", str(tmp / "ck"))
        losses = _losses(tmp / "metrics.jsonl")
        kinds = {name.split("/")[1] for terms in losses.values() for name in terms if name.count("/") == 2}
        assert len(losses) == 9 and kinds == set(KINDS), losses
        runs[shape] = losses, get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ck"))
    (ref_losses, ref_weights), *_ = runs.values()
    for shape, (losses, weights) in list(runs.items())[1:]:
        label = f"ranks x micro x accum = {shape}"
        _assert_same_losses(ref_losses, losses, label)
        _assert_same_weights(ref_weights, weights, label)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_checkpoint_resumes_on_another_number_of_ranks(training_data, tmp_path, stage):
    """2 ranks x micro 8 stopped at step 5 resume on 1 rank (micro 8 x accumulation 2) and on 4 ranks (micro 4):
    steps 6-10 give the uninterrupted run's losses and its step-10 fp32 weights to 1e-5 relative (ZeRO partitions
    through the universal checkpoint), and a shape whose global batch differs is refused with one line before
    anything is built."""
    reference = tmp_path / "2x8"
    reference.mkdir()
    config = _config(training_data, reference, steps=10, save_interval=5)
    _train(reference, config, stage, 2, 8, 1, "--save", str(reference))
    expected = {s: terms for s, terms in _losses(reference / "metrics.jsonl").items() if s > 5}
    stopped = tmp_path / "stopped_at_5"
    shutil.copytree(reference / tag_for(5), stopped / tag_for(5))
    publish_latest(stopped, tag_for(5))

    final = get_fp32_state_dict_from_zero_checkpoint(str(reference))  # step 10
    for ranks, micro, accum in ((1, 8, 2), (4, 4, 1)):
        tmp = tmp_path / f"{ranks}x{micro}x{accum}"
        tmp.mkdir()
        args = ("--load", str(stopped), "--save", str(tmp / "ck"))
        _train(tmp, _config(training_data, tmp, steps=10), stage, ranks, micro, accum, *args)
        label = f"ZeRO-{stage} resumed as {ranks}x{micro}x{accum}"
        _assert_same_losses(expected, _losses(tmp / "metrics.jsonl"), label)
        _assert_same_weights(final, get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ck")), label)

    if stage != 1:
        return  # the refusal comes before anything stage-specific: checked once
    tmp = tmp_path / "refused"
    tmp.mkdir()
    ds = write_ds_config(tmp / "ds.json", stage, micro=4)  # one process: global batch 4, not 16
    cmd = [sys.executable, str(ROOT / "flava_ds" / "pretrain.py"), "--deepspeed_config", str(ds)]
    result = subprocess.run(
        [*cmd, "--config", str(_config(training_data, tmp, steps=10)), "--load", str(stopped)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    refusal = [line for line in result.stderr.splitlines() if line.startswith("flava_ds:")]
    assert result.returncode == 1 and len(refusal) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "global batch 16" in refusal[0] and "global batch 4" in refusal[0], refusal

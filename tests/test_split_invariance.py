"""The same global batch gives the same losses and the same update on any cluster shape: every masked-token and
per-pair loss is a mean over the whole global batch of a step (data-parallel ranks x accumulation micro-steps),
not a mean of per-rank, per-micro-step means. Real `deepspeed` launches on gloo CPU ranks, tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from tests.train_fixtures import finished, launch, make_training_data, write_ds_config, write_run_config

GLOBAL_BATCH = 8
STEPS = 3
RTOL = 1e-5
# (data-parallel ranks, micro batch, accumulation steps), all GLOBAL_BATCH samples per step
SHAPES = [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("split_data"))


def _run(data, tmp: Path, kind: str, ranks: int, micro: int, accum: int) -> tuple[dict[str, list[float]], dict]:
    """Train STEPS steps of `kind` only; (every logged loss per name, step by step; the final fp32 weights)."""
    assert ranks * micro * accum == GLOBAL_BATCH
    tmp.mkdir(parents=True)
    metrics = tmp / "metrics.jsonl"
    config = write_run_config(
        tmp / "run.yaml", data, data={"task_ratios": {kind: 1.0}}, logging={"metrics_file": str(metrics)}
    )
    ds = write_ds_config(tmp / "ds.json", 1, micro=micro, accum=accum)
    args = ("--deepspeed_config", str(ds), "--config", str(config), "--train-steps", str(STEPS))
    result = launch(ranks, *args, "--save", str(tmp / "ck"))
    assert finished(result, ranks), result.stdout[-3000:] + result.stderr[-3000:]
    losses: dict[str, list[float]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        terms = {"loss": record["loss"]} if "loss" in record else {}
        terms.update({k: v for k, v in record.get("log", {}).items() if k.startswith("loss/")})
        for name, value in terms.items():
            losses.setdefault(name, []).append(value)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ck"))  # the final fp32 master weights
    return losses, weights


def _assert_same(reference: tuple[dict, dict], other: tuple[dict, dict], label: str) -> None:
    (ref_losses, ref_weights), (losses, weights) = reference, other
    assert sorted(losses) == sorted(ref_losses), label
    for name, values in ref_losses.items():
        assert len(values) == STEPS, (label, name, values)
        for step, (a, b) in enumerate(zip(values, losses[name]), start=1):
            assert abs(a - b) <= RTOL * abs(a), f"{label}: {name} at step {step}: {b} vs {a}"
    assert sorted(weights) == sorted(ref_weights), label
    # over the whole model: the attention key bias gets a gradient of pure roundoff (softmax ignores it), which
    # Adam turns into lr-sized steps of either sign, so that one tensor differs by noise on any two machines
    diff = sum((weights[k].double() - v.double()).square().sum() for k, v in ref_weights.items()).sqrt().item()
    norm = sum(v.double().square().sum() for v in ref_weights.values()).sqrt().item()
    assert diff <= RTOL * norm, f"{label}: weights differ by {diff} (norm {norm})"


@pytest.mark.parametrize("kind", ["image", "text"])
def test_masked_token_losses_and_updates_do_not_depend_on_the_cluster_shape(data, tmp_path, kind):
    """1 rank x micro 8, 2 ranks x micro 4, 1 rank x micro 4 x accumulation 2 and 2 ranks x micro 2 x accumulation
    2 train the same global batches: every logged loss term and the updated weights agree to 1e-5 relative."""
    runs = {shape: _run(data, tmp_path / "x".join(map(str, shape)), kind, *shape) for shape in SHAPES}
    reference = runs[SHAPES[0]]
    for shape in SHAPES[1:]:
        _assert_same(reference, runs[shape], f"{kind}, ranks x micro x accum = {shape}")


def test_image_text_losses_and_updates_do_not_depend_on_the_number_of_ranks(data, tmp_path):
    """Without accumulation the contrastive loss already scores each row against the columns of all ranks, and
    ITM, MMM and the contrastive rows are normalised over the global batch: 1 rank x 8 == 2 ranks x 4. (Under
    accumulation the contrastive columns span one micro-batch only, so image-text steps still differ there.)"""
    runs = [
        _run(data, tmp_path / f"{ranks}x{micro}", "image_text", ranks, micro, 1) for ranks, micro in ((1, 8), (2, 4))
    ]
    _assert_same(runs[0], runs[1], "image_text, 2 ranks x micro 4")

"""Non-finite steps under a real 2-rank ZeRO-2 run: skipped, counted, and stopping the run when they persist.
What the test proves is listed in docs/RELIABILITY.md."""

from __future__ import annotations

import torch

from flava_ds.train.checkpoint import export, read_latest, tag_for
from tests.fault_helpers import strict_records
from tests.launch import launch_pretrain
from tests.train_fixtures import write_ds_config, write_run_config


def test_non_finite_steps_are_skipped_then_stop_the_run(training_data, tmp_path):
    """ZeRO-2 fp32 with NaN losses injected at steps 3,4 and 7,8,9: the updates are skipped (parameters at step 4
    equal step 2's, at step 8 step 6's), counted, and the third in a row stops the run with a clear message and
    the last checkpoint intact."""
    ckpt = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    config = write_run_config(
        tmp_path / "run.yaml",
        training_data,
        train={"steps": 12, "log_interval": 1, "save_interval": 2, "max_nonfinite_steps": 3},
        checkpoint={"save": str(ckpt), "keep_last": 10},
        logging={"metrics_file": str(metrics)},
    )
    ds = write_ds_config(tmp_path / "ds.json", 2)
    result = launch_pretrain(
        2, "--deepspeed_config", str(ds), "--config", str(config), env={"FLAVA_DS_INJECT_NAN_STEPS": "3,4,7,8,9"}
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "3 consecutive steps with a non-finite loss or gradient" in output, output[-3000:]
    assert read_latest(ckpt) == tag_for(8)
    records = strict_records(metrics)
    assert {r["step"]: r["loss"] for r in records if "loss" in r and r["loss"] is None}.keys() == {3, 4, 7, 8}
    skipped = {r["step"]: r["log"]["skipped_steps"] for r in records if "log" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 3, 8: 4}

    def weights(step: int) -> dict[str, torch.Tensor]:
        from flava_ds.model import FlavaForPreTraining

        out = export(ckpt, tmp_path / f"export{step}", tag=tag_for(step))
        return FlavaForPreTraining.from_pretrained(out).state_dict()

    w2, w4, w6, w8 = (weights(s) for s in (2, 4, 6, 8))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # steps 3 and 4 changed nothing
    assert all(torch.equal(w6[k], w8[k]) for k in w6)
    assert not all(torch.equal(w4[k], w6[k]) for k in w4)  # steps 5 and 6 trained
    assert all(torch.isfinite(v).all() for v in w8.values())

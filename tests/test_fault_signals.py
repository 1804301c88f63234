"""Fault tolerance when processes die or are told to stop (deepspeed launcher, CPU ranks, gloo): SIGKILL at any
point, SLURM-style preemption signals, a stuck checkpoint, fatal errors, SIGTERM to the `deepspeed` command.
What each test proves is listed in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from flava_ds.train.checkpoint import read_latest, tag_for
from flava_ds.train.trainer import COMPLETE_MARKER, STOPPED_MARKER
from tests.fault_helpers import STEPS, Run, ended_cleanly, fault_config, last_step, strict_records
from tests.train_fixtures import step_losses, write_ds_config, write_run_config


def _start(
    tmp: Path, name: str, config: Path, ds: Path, ckpt: Path, *extra: str, env=None, metrics: Path | None = None
) -> tuple[Run, Path]:
    metrics = metrics or tmp / f"{name}.jsonl"
    args = ["--deepspeed_config", str(ds), "--config", str(config), "--save", str(ckpt), "--load", str(ckpt)]
    run = Run(2, tmp / f"{name}.log", *args, "--logging.metrics_file", str(metrics), *extra, env=env)
    return run, metrics


def _latest_step(ckpt: Path) -> int:
    tag = read_latest(ckpt)
    return int(tag.removeprefix("global_step")) if tag else 0


def _engine_files(ckpt: Path, step: int) -> bool:
    """DeepSpeed wrote every file of this 2-rank ZeRO-2 checkpoint."""
    names = ["mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2))]
    return all((ckpt / tag_for(step) / n).is_file() for n in names)


def _complete(ckpt: Path, step: int) -> bool:
    """The engine files plus the model config rank 0 writes just before publishing `latest`."""
    return _engine_files(ckpt, step) and (ckpt / tag_for(step) / "flava_config.json").is_file()


def _resumed_at(run: Run) -> int:
    """The step a run resumed from, read from its log (0 when it started fresh)."""
    for line in run.output().splitlines():
        if "resumed from" in line:
            return int(line.rsplit("at step", 1)[1])
    return 0


def test_sigkill_anywhere_resumes_from_the_last_complete_checkpoint(
    training_data, zero2_config, reference_run, tmp_path
):
    """SIGKILL of the whole process group inside a step, inside DeepSpeed's file writes and between the files and
    `latest`: `latest` only ever names a complete checkpoint, each resume starts there, and the per-step losses
    equal the uninterrupted run's bit for bit. All four runs append to one metrics file, which ends with every
    step exactly once (a resume drops the killed run's steps past its checkpoint) in strict JSON."""
    ckpt = tmp_path / "ckpt"
    config = fault_config(tmp_path, training_data, save_interval=10)
    rng = random.Random(0)
    runs: list[tuple[Run, int]] = []
    metrics = tmp_path / "metrics.jsonl"

    def start(name: str, *extra: str, env=None) -> Run:
        args = ("--checkpoint.keep_last", "2", *extra)
        run, _ = _start(tmp_path, name, config, zero2_config, ckpt, *args, env=env, metrics=metrics)
        runs.append((run, _latest_step(ckpt)))
        return run

    # 1. inside a step, at a random moment after the first checkpoint
    semaphores = set(Path("/dev/shm").glob("sem.mp-*"))
    run = start("mid_step", "--data.num_workers", "2")
    run.wait_until(lambda: last_step(metrics) >= 13, timeout=180)
    time.sleep(rng.uniform(0.0, 0.3))
    run.kill()
    assert not run.shm_buffers()  # the killed ranks' shared memory went with them
    assert not set(Path("/dev/shm").glob("sem.mp-*")) - semaphores  # and the loader workers' semaphore names
    assert _latest_step(ckpt) in (10, 20) and _complete(ckpt, _latest_step(ckpt))

    # 2. after the engine wrote every file of the next checkpoint, before `latest` names it (injected pause)
    before = _latest_step(ckpt)
    run = start("before_latest", env={"FLAVA_DS_INJECT_SAVE_DELAY_S": "60"})
    run.wait_until(lambda: _engine_files(ckpt, before + 10) or "saved checkpoint" in run.output(), timeout=180)
    assert "saved checkpoint" not in run.output()
    time.sleep(0.3)
    run.kill()
    assert _latest_step(ckpt) == before  # the complete-looking but unpublished global_step is not taken
    assert (ckpt / tag_for(before + 10)).is_dir()

    # 3. the moment the next checkpoint's directory appears: DeepSpeed is still writing its files
    before = _latest_step(ckpt)
    run = start("mid_write")
    run.wait_until(lambda: (ckpt / tag_for(before + 20)).is_dir(), timeout=180, poll=0.002)
    run.kill()
    assert _complete(ckpt, _latest_step(ckpt))

    run = start("final")
    run.wait()
    assert ended_cleanly(run, STEPS), run.tail()

    for run, resume_step in runs:
        assert _resumed_at(run) == resume_step, (run.log, resume_step)
    records = strict_records(metrics)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # once each, in order: no killed run's duplicates
    losses, _ = reference_run
    assert step_losses(metrics) == losses
    assert read_latest(ckpt) == tag_for(STEPS)
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [tag_for(50), tag_for(60)]  # pruned, no leftovers


def test_preemption_signals_checkpoint_exit_and_resume_exactly(training_data, zero2_config, reference_run, tmp_path):
    """SIGUSR1 to every process of the job (SLURM --signal; loader workers included) and SIGTERM to the
    deepspeed launcher (which forwards it): each time the ranks finish the step, checkpoint and exit 0 well
    within train.stop_deadline_s, and the resumed run continues the exact sample order."""
    ckpt = tmp_path / "ckpt"
    deadline = 30
    config = fault_config(tmp_path, training_data, stop_deadline_s=deadline)
    workers = ("--data.num_workers", "1")

    run, first = _start(tmp_path, "usr1", config, zero2_config, ckpt, *workers)
    run.wait_until(lambda: last_step(first) >= 8, timeout=180)
    sent = time.monotonic()
    run.signal_ranks(signal.SIGUSR1)
    run.wait(deadline)
    assert time.monotonic() - sent < deadline
    stopped = last_step(first)
    assert stopped < STEPS and read_latest(ckpt) == tag_for(stopped)
    assert ended_cleanly(run, stopped, STOPPED_MARKER) and COMPLETE_MARKER not in run.output(), run.tail()

    run, second = _start(tmp_path, "term", config, zero2_config, ckpt, *workers)
    run.wait_until(lambda: last_step(second) >= stopped + 8, timeout=180)
    sent = time.monotonic()
    run.launcher().send_signal(signal.SIGTERM)
    run.wait(deadline + 35)  # the launcher itself exits 1 after forwarding; the ranks exit 0 (below)
    assert time.monotonic() - sent < deadline
    stopped_again = last_step(second)
    assert stopped_again < STEPS and read_latest(ckpt) == tag_for(stopped_again)
    output = run.output()
    assert output.count(f"stopped at step {stopped_again}") == 2, output[-4000:]
    assert output.count(f"{STOPPED_MARKER} at step {stopped_again}") == 2, output[-4000:]

    run, third = _start(tmp_path, "rest", config, zero2_config, ckpt)
    run.wait()
    assert ended_cleanly(run, STEPS), run.tail()
    stitched = {**step_losses(first), **step_losses(second), **step_losses(third)}
    assert stitched == reference_run[0]


def test_stop_deadline_bounds_a_stuck_checkpoint(training_data, zero2_config, tmp_path):
    """A checkpoint that cannot finish within train.stop_deadline_s after SIGUSR1 ends the job at the deadline
    (exit 1), and `latest` never names the unfinished save."""
    ckpt = tmp_path / "ckpt"
    config = fault_config(tmp_path, training_data, stop_deadline_s=3)
    run, metrics = _start(tmp_path, "stuck", config, zero2_config, ckpt, env={"FLAVA_DS_INJECT_SAVE_DELAY_S": "120"})
    run.wait_until(lambda: last_step(metrics) >= 5, timeout=180)
    sent = time.monotonic()
    run.signal_ranks(signal.SIGUSR1)
    assert run.wait(60) != 0
    assert time.monotonic() - sent < 20
    assert "stop deadline of 3 s passed" in run.output()
    assert read_latest(ckpt) is None


def _descendants(run: Run) -> list[psutil.Process]:
    """The launcher, ranks, fork servers and loader workers of a run (the runner excluded)."""
    launcher = run.launcher()
    return [launcher, *launcher.children(recursive=True)]


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"FLAVA_DS_INJECT_NAN_STEPS": "6"}, "non-finite loss at step 6"),  # every rank raises NonFiniteError
        ({"FLAVA_DS_INJECT_ERROR": "1:6"}, "injected fault on rank 1 at step 6"),  # rank 0 waits in a collective
    ],
    ids=["all-ranks", "one-rank"],
)
def test_a_fatal_error_with_loader_workers_ends_every_rank_within_60_s(training_data, tmp_path, env, reason):
    """2 ranks with 2 loader workers each: a fatal error used to be logged and then the ranks never exited (Python's
    exit joined the workers, which ignore SIGTERM; the other rank waited in its all-gather). Now the job ends
    non-zero within 60 s with the reason in the log, and no process of it is left."""
    ds = write_ds_config(tmp_path / "zero0.json", 0)
    config = fault_config(tmp_path, training_data, log_interval=1)
    metrics = tmp_path / "metrics.jsonl"
    args = ["--deepspeed_config", str(ds), "--config", str(config), "--data.num_workers", "2"]
    run = Run(2, tmp_path / "run.log", *args, "--logging.metrics_file", str(metrics), env=env)
    try:
        run.wait_until(lambda: last_step(metrics) >= 5, timeout=180)
        processes = _descendants(run)
        assert len(processes) >= 1 + 2 + 2 * 2, processes  # launcher, ranks, at least the workers
        start = time.monotonic()
        returncode = run.wait(60)
        _, alive = psutil.wait_procs(processes, timeout=max(1.0, 60 - (time.monotonic() - start)))
        assert returncode != 0 and not alive, (returncode, alive, run.tail())
        assert reason in run.output() and "fatal error, ending the job" in run.output(), run.tail()
    finally:
        _kill_group(run)


def test_sigterm_to_the_deepspeed_command_checkpoints_and_leaves_nothing_running(training_data, zero2_config, tmp_path):
    """`deepspeed` (the runner the user started) forwards nothing on one node: SIGTERM to it killed it alone
    and left the launcher and ranks training as orphans. The ranks watch it: they checkpoint at the next step,
    exit 0, and every process of the job ends."""
    ckpt = tmp_path / "ckpt"
    config = fault_config(tmp_path, training_data, stop_deadline_s=60)
    run, metrics = _start(tmp_path, "runner", config, zero2_config, ckpt, "--data.num_workers", "2")
    try:
        run.wait_until(lambda: last_step(metrics) >= 5, timeout=180)
        processes = _descendants(run)
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(10) == -signal.SIGTERM  # the runner itself dies at once
        _, alive = psutil.wait_procs(processes, timeout=60)
        assert not alive, (alive, run.tail())
        stopped = last_step(metrics)
        assert 5 <= stopped < STEPS and read_latest(ckpt) == tag_for(stopped), run.tail()
        output = run.output()
        assert output.count(f"{STOPPED_MARKER} at step {stopped}") == 2 and "the launcher (pid" in output, output
        assert COMPLETE_MARKER not in output
    finally:
        _kill_group(run)


def _kill_group(run: Run) -> None:
    """Leave nothing behind whatever the test found (the run's processes share the runner's process group)."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_every_sample_once_per_epoch_across_four_ranks_despite_a_kill(training_data, tmp_path):
    """4 ranks x 300 steps of the text stream (micro batch 1, ZeRO-2, checkpoints every 50 steps) with a SIGKILL
    mid-run: in the trained trajectory (the killed run up to its last checkpoint, then the resumed run) every
    sample of each epoch is consumed exactly once across ranks, none twice, in the stream's epoch order."""
    from flava_ds.data.text_dataset import TextDataset
    from flava_ds.data.tokenizer import Tokenizer

    steps, ranks = 300, 4
    ckpt = tmp_path / "ckpt"
    config = write_run_config(
        tmp_path / "run.yaml",
        training_data,
        data={"kind_ratios": {"text": 1.0}},
        train={"steps": steps, "log_interval": 100, "save_interval": 50},
        checkpoint={"save": str(ckpt), "load": str(ckpt), "keep_last": 2},
    )
    ds = write_ds_config(tmp_path / "ds.json", 2, micro=1)
    args = ["--deepspeed_config", str(ds), "--config", str(config)]
    logs = [tmp_path / "samples_killed", tmp_path / "samples_resumed"]
    metrics = tmp_path / "killed.jsonl"
    run = Run(ranks, tmp_path / "killed.log", *args, "--logging.metrics_file", str(metrics),
              env={"FLAVA_DS_SAMPLE_LOG": str(logs[0])})  # fmt: skip
    kill_after = 110 + random.Random(1).randrange(30)
    run.wait_until(lambda: last_step(metrics) >= kill_after, timeout=300)
    run.kill()
    resumed_at = _latest_step(ckpt)
    assert resumed_at == 100  # mid-epoch: an epoch is 15 steps of this stream
    run = Run(ranks, tmp_path / "resumed.log", *args, env={"FLAVA_DS_SAMPLE_LOG": str(logs[1])})
    run.wait(300)
    assert run.output().count(f"{COMPLETE_MARKER} at step {steps}") == ranks, run.tail()

    keys: dict[tuple[int, int], tuple[int, int]] = {}  # (step, rank) -> (index, epoch)
    for log_dir, first, last in ((logs[0], 1, resumed_at), (logs[1], resumed_at + 1, steps)):
        for rank in range(ranks):
            for line in (log_dir / f"rank{rank}.jsonl").read_text().splitlines():
                record = json.loads(line)
                if first <= record["step"] <= last:
                    assert (record["step"], rank) not in keys and record["kind"] == "text"
                    [(index, epoch, _)] = record["keys"]
                    keys[record["step"], rank] = (index, epoch)
    assert sorted(keys) == [(s, r) for s in range(1, steps + 1) for r in range(ranks)]

    size = len(TextDataset(training_data["text"], Tokenizer.from_file(training_data["tokenizer"]), max_length=32))
    per_epoch = size // ranks * ranks
    stream = [keys[s, r] for s in range(1, steps + 1) for r in range(ranks)]  # global order: step, then rank
    epochs = [stream[i : i + per_epoch] for i in range(0, len(stream), per_epoch)]
    assert len(epochs) >= 5
    for number, epoch in enumerate(epochs):
        assert {e for _, e in epoch} == {number}
        indices = [i for i, _ in epoch]
        assert len(set(indices)) == len(indices)  # none twice
        if len(epoch) == per_epoch:
            assert set(indices) <= set(range(size))  # all but the < 4 dropped to fill whole global batches

"""Fault tolerance with real processes (deepspeed launcher, CPU ranks, gloo): SIGKILL at any point, SLURM-style
preemption signals, damaged shards, undecodable samples, non-finite steps and tampered checkpoints.
What each test proves is listed in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from flava_ds.train.checkpoint import UntrustedCheckpointError, check_pickles, export, read_latest, tag_for
from flava_ds.train.trainer import COMPLETE_MARKER, STOPPED_MARKER
from tests.fault_helpers import Run, last_step
from tests.train_fixtures import (
    KNOWN_EXIT_ABORT,
    ROOT,
    launch,
    make_training_data,
    step_losses,
    write_ds_config,
    write_run_config,
)

STEPS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    return write_ds_config(tmp_path_factory.mktemp("fault_ds") / "zero2.json", 2)


@pytest.fixture(scope="module")
def reference(data, ds_config, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """An uninterrupted STEPS-step run: its per-step losses and its checkpoint directory."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_run_config(tmp / "run.yaml", data, train={"steps": STEPS, "log_interval": 20})
    metrics = tmp / "metrics.jsonl"
    args = ["--deepspeed_config", str(ds_config), "--config", str(config), "--save", str(tmp / "ckpt")]
    run = Run(2, tmp / "run.log", *args, "--logging.metrics_file", str(metrics))
    run.wait()
    assert _ended_cleanly(run, STEPS), run.tail()
    losses = step_losses(metrics)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, tmp / "ckpt"


def _config(tmp: Path, data: dict[str, Path], **train) -> Path:
    return write_run_config(tmp / "run.yaml", data, train={"steps": STEPS, "log_interval": 20, **train})


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


def _ended_cleanly(run: Run, step: int, marker: str = COMPLETE_MARKER) -> bool:
    """Both ranks returned from training at `step` (the launcher may add DeepSpeed's known CPU abort at exit)."""
    output = run.output()
    return output.count(f"{marker} at step {step}") == 2 and (run.proc.returncode == 0 or KNOWN_EXIT_ABORT in output)


def _resumed_at(run: Run) -> int:
    """The step a run resumed from, read from its log (0 when it started fresh)."""
    for line in run.output().splitlines():
        if "resumed from" in line:
            return int(line.rsplit("at step", 1)[1])
    return 0


def test_sigkill_anywhere_resumes_from_the_last_complete_checkpoint(data, ds_config, reference, tmp_path):
    """SIGKILL of the whole process group inside a step, inside DeepSpeed's file writes and between the files and
    `latest`: `latest` only ever names a complete checkpoint, each resume starts there, and the per-step losses
    equal the uninterrupted run's bit for bit. All four runs append to one metrics file, which ends with every
    step exactly once (a resume drops the killed run's steps past its checkpoint) in strict JSON."""
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path, data, save_interval=10)
    rng = random.Random(0)
    runs: list[tuple[Run, int]] = []
    metrics = tmp_path / "metrics.jsonl"

    def start(name: str, *extra: str, env=None) -> Run:
        args = ("--checkpoint.keep_last", "2", *extra)
        run, _ = _start(tmp_path, name, config, ds_config, ckpt, *args, env=env, metrics=metrics)
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
    assert _ended_cleanly(run, STEPS), run.tail()

    for run, resume_step in runs:
        assert _resumed_at(run) == resume_step, (run.log, resume_step)
    records = [json.loads(line, parse_constant=_no_constant) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # once each, in order: no killed run's duplicates
    losses, _ = reference
    assert step_losses(metrics) == losses
    assert read_latest(ckpt) == tag_for(STEPS)
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [tag_for(50), tag_for(60)]  # pruned, no leftovers


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_preemption_signals_checkpoint_exit_and_resume_exactly(data, ds_config, reference, tmp_path):
    """SIGUSR1 to every process of the job (SLURM --signal; loader workers included) and SIGTERM to the
    deepspeed launcher (which forwards it): each time the ranks finish the step, checkpoint and exit 0 well
    within train.stop_deadline_s, and the resumed run continues the exact sample order."""
    ckpt = tmp_path / "ckpt"
    deadline = 30
    config = _config(tmp_path, data, stop_deadline_s=deadline)
    workers = ("--data.num_workers", "1")

    run, first = _start(tmp_path, "usr1", config, ds_config, ckpt, *workers)
    run.wait_until(lambda: last_step(first) >= 8, timeout=180)
    sent = time.monotonic()
    run.signal_ranks(signal.SIGUSR1)
    run.wait(deadline)
    assert time.monotonic() - sent < deadline
    stopped = last_step(first)
    assert stopped < STEPS and read_latest(ckpt) == tag_for(stopped)
    assert _ended_cleanly(run, stopped, STOPPED_MARKER) and COMPLETE_MARKER not in run.output(), run.tail()

    run, second = _start(tmp_path, "term", config, ds_config, ckpt, *workers)
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

    run, third = _start(tmp_path, "rest", config, ds_config, ckpt)
    run.wait()
    assert _ended_cleanly(run, STEPS), run.tail()
    stitched = {**step_losses(first), **step_losses(second), **step_losses(third)}
    assert stitched == reference[0]


def test_stop_deadline_bounds_a_stuck_checkpoint(data, ds_config, tmp_path):
    """A checkpoint that cannot finish within train.stop_deadline_s after SIGUSR1 ends the job at the deadline
    (exit 1), and `latest` never names the unfinished save."""
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path, data, stop_deadline_s=3)
    run, metrics = _start(tmp_path, "stuck", config, ds_config, ckpt, env={"FLAVA_DS_INJECT_SAVE_DELAY_S": "120"})
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
def test_a_fatal_error_with_loader_workers_ends_every_rank_within_60_s(data, tmp_path, env, reason):
    """2 ranks with 2 loader workers each: a fatal error used to be logged and then the ranks never exited (Python's
    exit joined the workers, which ignore SIGTERM; the other rank waited in its all-gather). Now the job ends
    non-zero within 60 s with the reason in the log, and no process of it is left."""
    ds = write_ds_config(tmp_path / "zero0.json", 0)
    config = _config(tmp_path, data, log_interval=1)
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


def test_sigterm_to_the_deepspeed_command_checkpoints_and_leaves_nothing_running(data, ds_config, tmp_path):
    """`deepspeed` (the runner the user started) forwards nothing on one node: SIGTERM to it killed it alone
    and left the launcher and ranks training as orphans. The ranks watch it: they checkpoint at the next step,
    exit 0, and every process of the job ends."""
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path, data, stop_deadline_s=60)
    run, metrics = _start(tmp_path, "runner", config, ds_config, ckpt, "--data.num_workers", "2")
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


def test_non_finite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    """ZeRO-2 fp32 with NaN losses injected at steps 3,4 and 7,8,9: the updates are skipped (parameters at step 4
    equal step 2's, at step 8 step 6's), counted, and the third in a row stops the run with a clear message and
    the last checkpoint intact."""
    ckpt = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    config = write_run_config(
        tmp_path / "run.yaml",
        data,
        train={"steps": 12, "log_interval": 1, "save_interval": 2, "max_nonfinite_steps": 3},
        checkpoint={"save": str(ckpt), "keep_last": 10},
        logging={"metrics_file": str(metrics)},
    )
    ds = write_ds_config(tmp_path / "ds.json", 2)
    result = launch(
        2, "--deepspeed_config", str(ds), "--config", str(config), env={"FLAVA_DS_INJECT_NAN_STEPS": "3,4,7,8,9"}
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "3 consecutive steps with a non-finite loss or gradient" in output, output[-3000:]
    assert read_latest(ckpt) == tag_for(8)
    records = [json.loads(line, parse_constant=_no_constant) for line in metrics.read_text().splitlines()]
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


def test_tampered_deepspeed_checkpoint_is_refused_unexecuted(reference, tmp_path):
    """DeepSpeed unpickles its files with weights_only=False; a model-states file carrying a payload is refused
    before that (resume and export), the payload never runs, and genuine checkpoints pass."""
    _, ckpt = reference
    check_pickles(ckpt / read_latest(ckpt))
    tampered = tmp_path / "ckpt"
    shutil.copytree(ckpt, tampered)
    marker = tmp_path / "pwned"
    state = torch.load(tampered / read_latest(tampered) / "mp_rank_00_model_states.pt", weights_only=False)
    state["payload"] = _Payload(marker)
    torch.save(state, tampered / read_latest(tampered) / "mp_rank_00_model_states.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"posix\.mkdir"):
        export(tampered, tmp_path / "export")
    from flava_ds.train import checkpoint

    with pytest.raises(UntrustedCheckpointError, match=r"mp_rank_00_model_states\.pt"):
        checkpoint.load(None, tampered)  # what the trainer calls on --load, before DeepSpeed sees the files
    assert not marker.exists()


def test_latest_naming_a_glob_is_refused_and_its_payload_never_runs(reference, data, ds_config, tmp_path):
    """A `latest` holding `evi[l]` used to pass the scan (no literal `evi[l]/`) while DeepSpeed globbed the files
    of `evil/`: resume (`--load`) and `convert_checkpoint.py from-deepspeed` both refuse it, and nothing runs."""
    _, ckpt = reference
    crafted = tmp_path / "ckpt"
    shutil.copytree(ckpt, crafted)
    marker = tmp_path / "pwned"
    evil = crafted / "evil"
    shutil.copytree(crafted / read_latest(crafted), evil)
    state = torch.load(evil / "mp_rank_00_model_states.pt", weights_only=False)
    state["payload"] = _Payload(marker)
    torch.save(state, evil / "mp_rank_00_model_states.pt")
    (crafted / "latest").write_text("evi[l]")
    config = _config(tmp_path, data)
    result = launch(2, "--deepspeed_config", str(ds_config), "--config", str(config), "--load", str(crafted))
    assert result.returncode != 0
    assert "checkpoint refused" in result.stderr and "'evi[l]'" in result.stderr, result.stderr[-3000:]
    assert "is not global_step<N>" in result.stderr
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "from-deepspeed"]
    result = subprocess.run([*tool, "--input", str(crafted), "--output", str(tmp_path / "export")],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode != 0 and "is not global_step<N>" in result.stderr, result.stderr[-3000:]
    assert not marker.exists(), "the payload ran"


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def _streams(data: dict[str, Path], **overrides):
    """Build a run's data streams in-process: the start-up checks, without a model or processes."""
    from flava_ds.data.tokenizer import Tokenizer
    from flava_ds.train.config import DataSection, StreamConfig
    from flava_ds.train.streams import TrainStreams

    section = DataSection(
        tokenizer=str(data["tokenizer"]),
        image_text=StreamConfig([str(data["pairs"])]),
        text=StreamConfig([str(data["text"])]),
        task_ratios={"image_text": 1.0, "text": 1.0},
        num_workers=0,
        text_max_length=32,
        **overrides,
    )
    return TrainStreams(section, Tokenizer.from_file(section.tokenizer), 64, 2, 0, 1)


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_files_are_refused_at_startup_naming_the_file(data, tmp_path):
    """Truncated shards fail on the manifest size; same-size corruption fails with data.verify_checksums; a
    `.bin`/`.idx` pair that disagrees (or an unreadable index) fails even without a manifest."""
    from flava_ds.data.arrow_dataset import ShardError

    pairs, text = tmp_path / "pairs", tmp_path / "text"
    shutil.copytree(data["pairs"], pairs)
    shutil.copytree(data["text"], text)
    damaged = {**data, "pairs": pairs, "text": text}
    shard = sorted(pairs.glob("*.arrow"))[1]

    _flip_byte(shard, shard.stat().st_size // 2)
    _flip_byte(text / "text.bin", 7)
    _streams(damaged)  # same sizes: only the checksums can tell
    with pytest.raises(ShardError, match=rf"{shard}: sha256 differs"):
        _streams(damaged, verify_checksums=True)
    shutil.copy(data["pairs"] / shard.name, shard)
    with pytest.raises(ShardError, match=r"text\.bin: sha256 differs"):
        _streams(damaged, verify_checksums=True)

    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=rf"{shard}: \d+ bytes, the manifest records"):
        _streams(damaged)

    bare = tmp_path / "bare"
    bare.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(data["text"] / f"text{suffix}", bare / f"text{suffix}")
    (bare / "text.bin").write_bytes((bare / "text.bin").read_bytes()[:-2])
    bare_data = {**data, "text": bare / "text"}
    with pytest.raises(ShardError, match=r"text\.bin: \d+ bytes, but .*text\.idx describes \d+ \(the pair disagrees\)"):
        _streams(bare_data)
    (bare / "text.idx").write_bytes(b"not an index at all")
    with pytest.raises(ShardError, match=r"text\.idx: not a readable indexed-dataset index"):
        _streams(bare_data)


def _corrupt_images(source: Path, target: Path, rows: list[int]) -> None:
    """Copy a pair shard directory and break the JPEG header of `rows` in place (file sizes stay the same)."""
    from flava_ds.data.arrow_dataset import ArrowShards

    shutil.copytree(source, target)
    shards = ArrowShards(target)
    jpegs = [shards.row(row, ("image",))["image"] for row in rows]
    for file in shards.files:
        raw = file.read_bytes()
        for jpeg in jpegs:
            if (at := raw.find(jpeg)) >= 0:
                raw = raw[:at] + bytes(16) + raw[at + 16 :]
        file.write_bytes(raw)


def test_undecodable_sample_is_replaced_deterministically_and_counted(data, tmp_path):
    """A sample whose image does not decode, or whose stored token ids lie beyond the vocabulary, is served as the
    next index (same epoch) with bad_samples = 1."""
    from flava_ds.data.sampler import SampleKey

    _corrupt_images(data["pairs"], tmp_path / "pairs", [3])
    shutil.copytree(data["text"], tmp_path / "text")
    raw = bytearray((tmp_path / "text" / "text.bin").read_bytes())
    raw[:2] = b"\xff\xff"  # the first token of document 0 becomes id 65535 (uint16), the vocabulary has 200
    (tmp_path / "text" / "text.bin").write_bytes(bytes(raw))
    streams = _streams({**data, "pairs": tmp_path / "pairs", "text": tmp_path / "text"}).streams
    text = streams["text"].dataset
    assert text[SampleKey(0, 1)]["bad_samples"] == 1
    assert text[SampleKey(0, 1)]["key"] == SampleKey(1, 1) and (text[SampleKey(0, 1)]["input_ids"] < 200).all()

    stream = streams["image_text"]
    replaced = stream.dataset[SampleKey(3, 2)]
    following = stream.dataset[SampleKey(4, 2)]
    assert replaced["bad_samples"] == 1 and "bad_samples" not in following
    assert replaced["key"] == SampleKey(4, 2) and torch.equal(replaced["pixel_values"], following["pixel_values"])
    batch = stream.collate([replaced, following])
    assert int(batch["bad_samples"]) == 1


def test_bad_samples_are_logged_and_stop_the_run_over_the_threshold(data, ds_config, tmp_path):
    """2 of 36 image-text samples do not decode: training goes on (TensorBoard data/bad_samples counts them) until
    data.max_bad_sample_fraction = 0.02 is checked (after 50 samples) and stops the run with a clear message."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _corrupt_images(data["pairs"], tmp_path / "pairs", [3, 10])
    tb = tmp_path / "tb"
    config = write_run_config(
        tmp_path / "run.yaml",
        {**data, "pairs": tmp_path / "pairs"},
        data={"task_ratios": {"image_text": 1.0}, "max_bad_sample_fraction": 0.02},
        train={"steps": 40, "log_interval": 1},
        logging={"tensorboard_dir": str(tb)},
    )
    result = launch(2, "--deepspeed_config", str(ds_config), "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "samples failed to decode by step 13 (more than data.max_bad_sample_fraction=0.02)" in output, output[-3000:]
    events = EventAccumulator(str(tb))
    events.Reload()
    counts = [e.value for e in events.Scalars("data/bad_samples")]
    assert counts[0] == 0 and counts[-1] >= 2 and len(counts) == 12


def test_every_sample_once_per_epoch_across_four_ranks_despite_a_kill(data, tmp_path):
    """4 ranks x 300 steps of the text stream (micro batch 1, ZeRO-2, checkpoints every 50 steps) with a SIGKILL
    mid-run: in the trained trajectory (the killed run up to its last checkpoint, then the resumed run) every
    sample of each epoch is consumed exactly once across ranks, none twice, in the stream's epoch order."""
    from flava_ds.data.text_dataset import TextDataset
    from flava_ds.data.tokenizer import Tokenizer

    steps, ranks = 300, 4
    ckpt = tmp_path / "ckpt"
    config = write_run_config(
        tmp_path / "run.yaml",
        data,
        data={"task_ratios": {"text": 1.0}},
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
                    assert (record["step"], rank) not in keys and record["task"] == "text"
                    [(index, epoch, _)] = record["keys"]
                    keys[record["step"], rank] = (index, epoch)
    assert sorted(keys) == [(s, r) for s in range(1, steps + 1) for r in range(ranks)]

    size = len(TextDataset(data["text"], Tokenizer.from_file(data["tokenizer"]), max_length=32))
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
        torch.save({"weight": _Payload(marker)}, directory / "pytorch_model.bin")
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

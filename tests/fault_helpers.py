"""The fault tests' shared pieces: `deepspeed flava_ds/pretrain.py` as a background process group that tests can
signal and kill, their run config, and what they read back from a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import psutil

from flava_ds.train.trainer import COMPLETE_MARKER
from tests.launch import ROOT, free_port, pretrain_command
from tests.train_fixtures import KNOWN_EXIT_ABORT, write_run_config

STEPS = 60  # the length of the fault tests' runs, the uninterrupted reference run's included


class Run:
    """One launcher (runner -> deepspeed.launcher.launch -> ranks) in its own session, output in a log file."""

    def __init__(self, nproc: int, log: Path, *args: str, env: dict[str, str] | None = None):
        self.nproc, self.log, self.port = nproc, log, free_port()
        cmd, full_env = pretrain_command(nproc, *args, port=self.port, env=env)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120.0, poll: float = 0.01) -> None:
        """Poll `condition`; fail if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before the condition:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s:\n{self.tail()}")
            time.sleep(poll)

    def wait(self, timeout: float = 300.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: launcher, ranks and loader workers die at once (a node failure)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def launcher(self) -> psutil.Process:
        """The deepspeed.launcher.launch process, which forwards SIGINT/SIGTERM to the ranks."""
        for child in psutil.Process(self.proc.pid).children():
            if "deepspeed.launcher.launch" in " ".join(child.cmdline()):
                return child
        raise AssertionError("no deepspeed.launcher.launch process")

    def ranks(self) -> list[psutil.Process]:
        ranks = self.launcher().children()
        assert len(ranks) == self.nproc, ranks
        return ranks

    def signal_ranks(self, signum: int) -> None:
        """Signal every rank and its descendants (loader workers), as SLURM signals all processes of a job step."""
        for rank in self.ranks():
            for process in [rank, *rank.children(recursive=True)]:
                process.send_signal(signum)

    def shm_buffers(self) -> list[Path]:
        """DeepSpeed's CPU all-reduce buffers of this run still named in /dev/shm (each holds 69 MB of RAM)."""
        return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{self.port}_*"))

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]


def last_step(metrics: Path) -> int:
    """The last step with a loss in a metrics file (0 when none yet)."""
    if not metrics.is_file():
        return 0
    complete = metrics.read_text().split("\n")[:-1]  # the file may be mid-append
    steps = [json.loads(line)["step"] for line in complete if '"loss"' in line]
    return max(steps, default=0)


def fault_config(tmp: Path, data: dict[str, Path], **train) -> Path:
    """tmp/run.yaml: a STEPS-step run on `data` that logs every 20 steps; `train` updates its train section."""
    return write_run_config(tmp / "run.yaml", data, train={"steps": STEPS, "log_interval": 20, **train})


def ended_cleanly(run: Run, step: int, marker: str = COMPLETE_MARKER) -> bool:
    """Both ranks returned from training at `step` (the launcher may add DeepSpeed's known CPU abort at exit)."""
    output = run.output()
    return output.count(f"{marker} at step {step}") == 2 and (run.proc.returncode == 0 or KNOWN_EXIT_ABORT in output)


def strict_records(metrics: Path) -> list[dict]:
    """The records of a metrics file, parsed as strict JSON (NaN or Infinity fail)."""
    return [json.loads(line, parse_constant=_no_constant) for line in metrics.read_text().splitlines()]


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


class Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (str(self.marker),))

"""How a rank process ends: on request (signals, the launcher gone) with a checkpoint, or on a fatal error at once.

* `StopSignal`: SIGTERM / SIGUSR1 (SLURM preemption), or the launcher the user started disappearing, ask for a
  checkpoint after the current step and a clean exit within `train.stop_deadline_s`.
* `LauncherWatch`: `deepspeed` (the runner the user starts) forwards no signal on a single node: SIGTERM to it
  kills it alone and leaves `deepspeed.launcher.launch` and the ranks training as orphans. Each rank therefore
  watches the processes above it and, once one is gone, stops as if signalled.
* `exit_on_fatal_error`: any exception out of training ends the rank now. Python's normal exit would join the
  loader workers, which ignore SIGTERM by design (only the trainer decides when to stop), so it hung forever,
  and the other ranks waited in their next collective. The rank logs the reason, kills its loader workers,
  flushes and `os._exit`s; its closed sockets then fail the peers' pending collectives (gloo at once; NCCL at
  the process-group timeout, `train.collective_timeout_s`), which end the same way, and the launcher, seeing a
  rank exit non-zero, terminates the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

import psutil

log = logging.getLogger("flava_ds.train")
FATAL_EXIT_CODE = 1


class StopSignal:
    """A request to checkpoint and stop, honoured after the current step; a watchdog bounds how long it may take."""

    def __init__(self, deadline_s: float):
        self.requested = False
        self.deadline_s = deadline_s
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.request(f"received signal {signum}"))

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested = True
            log.warning("%s: checkpointing and stopping within %.0f s", reason, self.deadline_s)
            watchdog = threading.Timer(self.deadline_s, self._overdue)
            watchdog.daemon = True
            watchdog.start()

    def _overdue(self) -> None:
        log.error("stop deadline of %.0f s passed before the checkpoint finished; exiting", self.deadline_s)
        _flush_logs()
        os._exit(1)


def launchers_to_watch(process: psutil.Process | None = None) -> list[psutil.Process]:
    """The processes whose end should stop this rank: its launcher (the parent, when a launcher set LOCAL_RANK:
    torchrun or DeepSpeed's), and above DeepSpeed's `deepspeed.launcher.launch` also the `deepspeed` command
    that started it. A shell is never watched: `nohup torchrun ... &` or `nohup python pretrain.py &` must
    outlive it."""
    process = process or psutil.Process()
    chain = []
    parent = process.parent()
    if "LOCAL_RANK" in os.environ and parent is not None and parent.pid != 1:
        chain.append(parent)
        grandparent = parent.parent()
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()) and grandparent and grandparent.pid != 1:
            chain.append(grandparent)
    return chain


class LauncherWatch:
    """Polls the launchers once a second; the first one gone calls `on_gone` with the reason, once."""

    def __init__(self, on_gone: Callable[[str], None], interval_s: float = 1.0):
        self.watched = launchers_to_watch()
        self.on_gone, self.interval_s = on_gone, interval_s
        self._thread = threading.Thread(target=self._run, name="flava-ds-launcher-watch", daemon=True)
        if self.watched:
            self._thread.start()

    def _run(self) -> None:
        names = {p.pid: " ".join(p.cmdline()[:4]) for p in self.watched}
        stopped = threading.Event()
        while not stopped.wait(self.interval_s):
            for process in self.watched:
                if not process.is_running():  # psutil compares start times: a reused pid is not "running"
                    self.on_gone(f"the launcher (pid {process.pid}: {names[process.pid]}) is gone")
                    return


def exit_on_fatal_error(err: BaseException, rank: int, close: Callable[[], None] | None = None) -> None:
    """Log why this rank fails, run `close` (kills the loader workers), flush, and end the process now."""
    reason = "".join(traceback.format_exception_only(type(err), err)).strip()
    log.error("rank %d: fatal error, ending the job: %s\n%s", rank, reason, "".join(traceback.format_exception(err)))
    print(f"flava_ds: rank {rank} failed: {reason}", file=sys.stderr, flush=True)
    try:
        if close is not None:
            close()
    finally:
        _flush_logs()
        os._exit(FATAL_EXIT_CODE)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()

"""Preloaded by the fork server that starts the training streams' loader workers, and imported by nothing else.

Importing it makes the calling process ignore SIGTERM and SIGUSR1. The fork server is part of a rank's process
tree, so SLURM's signals and the DeepSpeed launcher's forwarded SIGTERM reach it too; if it died, every loader
worker would see its parent gone and exit, and the trainer would fail before it could save its checkpoint.
Stopping is the trainer's decision (`flava_ds.train.signals.StopSignal`). The server exits with the trainer,
when the trainer's end of its pipe closes.
"""

import signal

for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, signal.SIG_IGN)

import flava_ds.train.streams  # noqa: E402, F401  (torch and the readers, imported once for every worker)

"""Launching the tests' real processes on CPU (gloo): torchrun workers and `deepspeed flava_ds/pretrain.py`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A local TCP port nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_env(updates: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH; `None` in `updates` removes a key."""
    env = dict(os.environ)
    for key, value in (updates or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def rank_env(updates: dict[str, str] | None = None) -> dict[str, str]:
    """`python_env` for launched ranks: one thread each (the CPU cores are shared), unbuffered output."""
    return python_env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(updates or {})})


def run_worker(script: Path, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a worker script on `nproc` local processes under torchrun (the workers join a gloo group); fail the
    test with the output's tail unless every process exited 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    env = rank_env({"PYTHONWARNINGS": "ignore"})
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def pretrain_command(
    nproc: int, *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `deepspeed --num_gpus N flava_ds/pretrain.py ...` on CPU ranks (gloo)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(port or free_port()), str(ROOT / "flava_ds" / "pretrain.py"), *args]  # fmt: skip
    return cmd, rank_env(env)


def launch_pretrain(
    nproc: int, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run pretrain.py under the DeepSpeed launcher to completion."""
    cmd, full_env = pretrain_command(nproc, *args, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)

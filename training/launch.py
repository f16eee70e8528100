"""Start `training.train` as several local processes (DDP over gloo on CPUs, NCCL on GPUs) with torchrun.

    torchrun_command(2, ["--config", "training/configs/demo.yaml"])

The rendezvous stays on this machine (127.0.0.1, a free port). Each process runs with `threads` torch
threads (OMP_NUM_THREADS), so N processes x 1 thread use N cores without oversubscribing them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

from lisa_core.errors import ConfigurationError


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(processes: int, train_args: Sequence[str]) -> list[str]:
    """The command that runs `python -m training.train train_args` as `processes` DDP workers here."""
    if processes < 1:
        raise ConfigurationError(f"processes must be at least 1, got {processes}")
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_local_port()),
        "-m", "training.train", *train_args,
    ]


def run_processes(processes: int, train_args: Sequence[str], threads: Optional[int] = None) -> None:
    """Run `training.train train_args` on `processes` local workers and wait; raise if any worker fails."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(torchrun_command(processes, train_args), env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training on {processes} processes failed (exit status {done.returncode})")

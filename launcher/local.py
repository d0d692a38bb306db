"""Start N worker processes on this machine, wired as torchrun would wire them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int, threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    return env


def launch_local(nproc: int, worker_args: list[str], timeout_s: float | None = None) -> int:
    """Run ``python -m disttrain.launcher worker_args`` as ``nproc`` processes; returns the worst exit code.

    Rank 0's output goes to this process's stdout; if a worker fails, the others are stopped.
    """
    if nproc < 1:
        raise ValueError(f"need at least one worker, got {nproc}")
    port = free_port()
    command = [sys.executable, "-m", "disttrain.launcher", *worker_args]
    procs = [subprocess.Popen(command, env=worker_env(rank, nproc, port)) for rank in range(nproc)]
    codes: list[int] = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout_s))
            if codes[-1] != 0:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            codes.append(proc.wait())
    return max(codes, key=abs)

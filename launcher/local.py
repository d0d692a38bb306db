"""Start N worker processes on this machine, wired as torchrun would wire them."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)


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
    """Run ``python -m disttrain.launcher worker_args`` as ``nproc`` processes.

    Returns 0 when all succeed, else the exit code of the first worker that failed (the others
    are then stopped). Workers share this process's stdout and stderr.
    """
    if nproc < 1:
        raise ValueError(f"need at least one worker, got {nproc}")
    port = free_port()
    command = [sys.executable, "-m", "disttrain.launcher", *worker_args]
    procs = [subprocess.Popen(command, env=worker_env(rank, nproc, port)) for rank in range(nproc)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    first_failure = 0
    try:
        while first_failure == 0 and any(proc.poll() is None for proc in procs):
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers still running after %.0f s: stopping them", timeout_s)
                first_failure = 124
                break
            first_failure = next((proc.returncode for proc in procs if proc.returncode), 0)
            time.sleep(0.1)
        first_failure = first_failure or next((proc.returncode for proc in procs if proc.poll()), 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
    if first_failure:
        failed = [rank for rank, proc in enumerate(procs) if proc.returncode == first_failure]
        log.error("worker rank %s exited with code %d", failed[0] if failed else "?", first_failure)
    return first_failure

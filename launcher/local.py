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


TIMED_OUT = 124


def wait_for_workers(procs: list[subprocess.Popen], timeout_s: float | None = None) -> int:
    """0 when every process exits 0; else the first non-zero exit code as soon as one appears
    (TIMED_OUT once ``timeout_s`` has passed). Processes still running are left running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while any(proc.poll() is None for proc in procs):
        failed = next((proc.returncode for proc in procs if proc.returncode), 0)
        if failed:
            return failed
        if deadline is not None and time.monotonic() > deadline:
            return TIMED_OUT
        time.sleep(0.1)
    return next((proc.returncode for proc in procs if proc.returncode), 0)


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
    try:
        first_failure = wait_for_workers(procs, timeout_s)
        if first_failure == TIMED_OUT:
            log.error("workers still running after %.0f s: stopping them", timeout_s)
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

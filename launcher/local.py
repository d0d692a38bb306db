"""Start N worker processes on this machine, wired as torchrun would wire them, and relay their output.

The workers share this terminal, so none of them draws on it: rank 0 reports its progress in
lines that the relay turns into the one progress bar, and every other line is written above it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from tqdm import tqdm

from disttrain.progress import PROGRESS_ENV, TerminalBar, parse_progress

log = logging.getLogger(__name__)

TIMED_OUT = 124


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int, threads: int = 1, per_node: int = 1) -> dict[str, str]:
    """torchrun's variables for local process ``rank``. With ``per_node`` > 1 the processes form
    emulated nodes of that many, numbered node by node; otherwise they are one machine's processes."""
    local_size = per_node if per_node > 1 else world_size
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank % local_size),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(local_size),
        GROUP_RANK=str(rank // local_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    return env


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


def wait_for_all(procs: list[subprocess.Popen], timeout_s: float | None = None) -> bool:
    """Wait until every process has exited; False if ``timeout_s`` passed first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while any(proc.poll() is None for proc in procs):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` or ``exited with code 2``."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class OutputRelay:
    """Copies the workers' lines to this process's stdout and stderr, and draws their progress bar."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bar: TerminalBar | None = None
        self._threads: list[threading.Thread] = []

    def follow(self, stream: IO[bytes], out: IO[str]) -> None:
        thread = threading.Thread(target=self._copy, args=(stream, out), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _copy(self, stream: IO[bytes], out: IO[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            state = parse_progress(line)
            with self._lock:
                if state is not None:
                    self._show(state)
                elif self._bar is not None:
                    tqdm.write(line, file=out)
                else:
                    out.write(line + "\n")
                    out.flush()

    def _show(self, state: dict) -> None:
        if self._bar is None:  # this process's own log lines go above it too
            self._bar = TerminalBar(state["total"], state["step"], state["desc"])
        self._bar.update(state["step"], **state.get("postfix", {}))

    def close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()


def python_module(module: str, *args: str) -> list[str]:
    """The command running ``python -m module args`` in this interpreter, the working directory kept off
    sys.path (-P): in a checkout's root, its disttrain/ folder would come before the installed package,
    which a non-editable install leaves without the launcher and kernels sub-packages mapped in."""
    return [sys.executable, "-P", "-m", module, *args]


def launch_local(
    nproc: int, worker_args: list[str], timeout_s: float | None = None, elastic: bool = False, per_node: int = 1
) -> int:
    """Run ``python -m disttrain.launcher worker_args`` as ``nproc`` processes (in nodes of ``per_node``).

    Static (torchrun-style) workers stand or fall together: the first failure stops the others and
    its exit code is returned. Elastic workers (under a coordinator) may be lost on the way: the
    run succeeds (0) when any worker finished it, and the lost ones are named.
    """
    if nproc < 1:
        raise ValueError(f"need at least one worker, got {nproc}")
    port = free_port()
    command = python_module("disttrain.launcher", *worker_args)
    relay = OutputRelay()
    procs = []
    for rank in range(nproc):
        env = {**worker_env(rank, nproc, port, per_node=per_node), PROGRESS_ENV: "lines"}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        relay.follow(proc.stdout, sys.stdout)
        relay.follow(proc.stderr, sys.stderr)
        procs.append(proc)
    try:
        if elastic:
            finished = wait_for_all(procs, timeout_s)
            code = elastic_outcome(procs) if finished else TIMED_OUT
        else:
            code = wait_for_workers(procs, timeout_s)
        if code == TIMED_OUT:
            log.error("workers still running after %.0f s: stopping them", timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
        relay.close()
    if code and not elastic:
        failed = next(rank for rank, proc in enumerate(procs) if proc.returncode == code)
        log.error("worker rank %d %s", failed, describe_exit(code))
    return code


def elastic_outcome(procs: list[subprocess.Popen]) -> int:
    """0 when at least one elastic worker finished the run; else the first worker's exit code."""
    lost = [(index, proc) for index, proc in enumerate(procs) if proc.returncode != 0]
    for index, proc in lost:
        log.warning("worker %d (pid %d) was lost: %s", index, proc.pid, describe_exit(proc.returncode))
    finished = len(procs) - len(lost)
    if finished:
        log.info("%d of %d workers finished the run", finished, len(procs))
        return 0
    return lost[0][1].returncode

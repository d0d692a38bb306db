"""A local elastic job: a coordinator process and worker processes on this machine.

Tests and the chaos benchmark use it to start, disturb and inspect real jobs."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from disttrain.elastic.protocol import SECRET_ENV
from disttrain.launcher.local import free_port, python_module

STEP_LINE = re.compile(rb"step (\d+): val loss")


@dataclass(frozen=True)
class Placement:
    """Where a job's processes run: by default all of them on this machine's loopback."""

    coordinator_host: str = "127.0.0.1"
    slots: int | None = None  # how many workers may run at once (None: any number)
    env: dict[str, str] = field(default_factory=dict)  # added to every process's environment

    def coordinator_command(self, argv: list[str]) -> list[str]:
        return argv

    def worker_command(self, slot: int, argv: list[str]) -> list[str]:
        """``argv`` run as the worker in ``slot`` (slots of live workers are never shared)."""
        return argv


class WorkersStillRunning(AssertionError):
    """Workers did not exit in the time given (an AssertionError, as tests expect of this helper)."""


class ElasticJob:
    """Start, disturb and inspect a coordinator and its workers."""

    def __init__(
        self,
        workdir: Path,
        worker_flags: list[str],
        steps: int = 300,
        link_mbit: float = 2.0,
        heartbeat_timeout_s: float = 2.0,
        placement: Placement = Placement(),
    ):
        self.workdir = workdir
        self.worker_flags = worker_flags
        self.placement = placement
        self.port, self.store_port = free_port(), free_port()
        self.address = f"tcp://{placement.coordinator_host}:{self.port}"
        self.env = {**os.environ, SECRET_ENV: secrets.token_hex(32), "OMP_NUM_THREADS": "1", **placement.env}
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(name, None)
        self.steps = steps
        self.link_mbit = link_mbit
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: list[subprocess.Popen] = []
        self.slots: list[int] = []  # each worker's slot in the placement
        self.coordinator: subprocess.Popen | None = None
        self._coordinators_started = 0

    def start_coordinator(self, start_workers: int = 1, extra: list[str] | None = None) -> None:
        self._coordinators_started += 1
        log = open(self.workdir / f"coordinator-{self._coordinators_started}.log", "wb")
        self.coordinator = subprocess.Popen(
            self.placement.coordinator_command([
                *python_module("disttrain.cli"), "coordinator", "--bind", self.address,
                "--store-port", str(self.store_port), "--start-workers", str(start_workers),
                "--heartbeat-timeout-s", str(self.heartbeat_timeout_s), *(extra or []),
            ]),
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )

    def start_node(self, processes: int) -> list[int]:
        """A node of ``processes`` workers, started as torchrun would start one node on its own; their indices."""
        run_id = secrets.token_hex(4)
        indices = []
        for local_rank in range(processes):
            node = {"LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": run_id}
            self.start_worker(env=node)
            indices.append(len(self.workers) - 1)
        return indices

    def start_worker(self, secret: str | None = None, extra: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker process; ``env`` adds to its environment (a node's variables, say)."""
        index = len(self.workers)
        env = {**self.env, **(env or {}), **({} if secret is None else {SECRET_ENV: secret})}
        log = open(self.workdir / f"worker-{index}.log", "wb")
        slot = self._free_slot()
        proc = subprocess.Popen(
            self.placement.worker_command(slot, [
                *python_module("disttrain.launcher"), "--coordinator", self.address,
                "--summary-file", str(self.workdir / "summary-{pid}.json"),
                "--steps", str(self.steps), "--eval_every", "10", "--digest_every", "10",
                "--link_mbit", str(self.link_mbit), "--timeout-s", "60", "--log-all-ranks", *self.worker_flags, *(extra or []),
            ]),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        self.slots.append(slot)
        return proc

    def _free_slot(self) -> int:
        taken = {slot for slot, proc in zip(self.slots, self.workers) if proc.poll() is None}
        slot = min(set(range(len(self.workers) + 1)) - taken)
        if self.placement.slots is not None and slot >= self.placement.slots:
            raise AssertionError(f"all {self.placement.slots} slots of the placement hold live workers")
        return slot

    def coordinator_log(self, started: int = 1) -> bytes:
        """The log of the ``started``-th coordinator this job started (b"" before it wrote any)."""
        path = self.workdir / f"coordinator-{started}.log"
        return path.read_bytes() if path.exists() else b""

    def wait_until_serving(self, timeout_s: float = 60) -> None:
        """Block until the latest coordinator listens."""
        deadline = time.monotonic() + timeout_s
        while b"coordinator for job" not in self.coordinator_log(self._coordinators_started):
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the coordinator is not serving:\n{self.coordinator_log(self._coordinators_started).decode()}")
            time.sleep(0.05)

    def log(self, index: int) -> bytes:
        return (self.workdir / f"worker-{index}.log").read_bytes()

    def latest_step(self, index: int) -> int:
        steps = [int(m) for m in STEP_LINE.findall(self.log(index))]
        return max(steps, default=0)

    def wait_for_step(self, index: int, step: int, timeout_s: float = 120) -> float:
        """Block until worker ``index`` logged an evaluation at ``step`` or later; returns when."""
        deadline = time.monotonic() + timeout_s
        while self.latest_step(index) < step:
            if self.workers[index].poll() is not None:
                raise AssertionError(f"worker {index} exited early:\n{self.log(index).decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {index} did not reach step {step}:\n{self.log(index).decode()[-3000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def wait_for_exit(self, indices: list[int], timeout_s: float = 180) -> list[int]:
        deadline = time.monotonic() + timeout_s
        codes = []
        for index in indices:
            try:
                codes.append(self.workers[index].wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise WorkersStillRunning(f"worker {index} still running:\n{self.log(index).decode()[-3000:]}") from None
        return codes

    def summary(self, index: int) -> dict:
        return json.loads((self.workdir / f"summary-{self.workers[index].pid}.json").read_text())

    def assert_finished_identically(self, indices: list[int]) -> list[dict]:
        """Every listed worker completed the run with the same parameters, and no collective ever waited
        for its timeout (which is what members issuing different collectives looks like); their summaries."""
        for index in indices:
            assert b"Application timeout" not in self.log(index), self.log(index).decode()[-3000:]
        summaries = [self.summary(i) for i in indices]
        assert {s["parameter_digest"] for s in summaries} == {summaries[0]["parameter_digest"]}, summaries
        assert all(s["steps"] == self.steps for s in summaries), [s["steps"] for s in summaries]
        return summaries

    def signal(self, index: int, sig: int) -> None:
        os.kill(self.workers[index].pid, sig)

    def close(self) -> None:
        for proc in [*self.workers, self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

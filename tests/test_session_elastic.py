"""disttrain.Session in the user's own loop under a real coordinator: a worker killed with
SIGKILL and one joining mid-run, all in examples/own_loop_elastic.py processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from disttrain.launcher.elastic_job import ElasticJob

import disttrain

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop_elastic.py"
STEPS = 120
STEP_LINE = re.compile(rb"step +(\d+): loss")


class UserLoops:
    """examples/own_loop_elastic.py processes against the coordinator of an ElasticJob."""

    def __init__(self, job: ElasticJob, link_mbit: float, method: str = disttrain.DEFAULT_METHOD):
        self.job = job
        self.link_mbit = link_mbit
        self.method = method
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        log = open(self.job.workdir / f"loop-{len(self.procs)}.log", "wb")
        command = [
            sys.executable, str(EXAMPLE), "--coordinator", self.job.address, "--steps", str(STEPS),
            "--link-mbit", str(self.link_mbit), "--method", self.method,
        ]
        self.procs.append(subprocess.Popen(command, env=self.job.env, stdout=subprocess.PIPE, stderr=log))

    def log(self, index: int) -> bytes:
        return (self.job.workdir / f"loop-{index}.log").read_bytes()

    def wait_for_step(self, index: int, step: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while max(map(int, STEP_LINE.findall(self.log(index))), default=-1) < step:
            assert self.procs[index].poll() is None, self.log(index).decode()[-3000:]
            assert time.monotonic() < deadline, self.log(index).decode()[-3000:]
            time.sleep(0.1)

    def summary(self, index: int, timeout_s: float = 180) -> dict:
        out, _ = self.procs[index].communicate(timeout=timeout_s)
        assert self.procs[index].returncode == 0, self.log(index).decode()[-3000:]
        return json.loads(out.decode().strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(params=[(disttrain.DEFAULT_METHOD, 0.15), (disttrain.DEFAULT_PER_STEP_METHOD, 2.0)], ids=lambda p: p[0])
def loops(tmp_path, request):
    """Local-step rounds, or a per-step exchange whose failed steps are redone from the gradients in .grad
    (each on a link slow enough that the run outlasts the kill and the join)."""
    method, link_mbit = request.param
    job = ElasticJob(tmp_path, [])
    loops = UserLoops(job, link_mbit=link_mbit, method=method)
    yield loops
    loops.close()
    job.close()


@pytest.mark.slow
def test_user_loops_survive_a_kill_9_and_admit_a_joiner_with_identical_parameters(loops):
    loops.job.start_coordinator(start_workers=3)
    for _ in range(3):
        loops.start()
    loops.wait_for_step(0, 30)
    loops.procs[2].send_signal(signal.SIGKILL)
    loops.wait_for_step(0, 50)
    loops.start()  # the joiner
    summaries = [loops.summary(i) for i in (0, 1, 3)]
    assert {s["parameter_digest"] for s in summaries} == {summaries[0]["parameter_digest"]}
    assert all(s["steps"] == STEPS and s["workers"] == 3 for s in summaries)
    assert 0 < summaries[2]["started_at"] < STEPS  # the joiner came in mid-run, with a donor's steps
    assert b"regrouping" in loops.log(0) + loops.log(1)
    coordinator = (loops.job.workdir / "coordinator-1.log").read_text()
    assert coordinator.count("left (run finished)") == 3


@pytest.mark.slow
def test_a_user_loop_joining_a_finished_job_is_told_so(tmp_path):
    job = ElasticJob(tmp_path, [])
    loops = UserLoops(job, link_mbit=100.0)
    try:
        job.start_coordinator(start_workers=1)
        loops.start()
        digest = loops.summary(0)["parameter_digest"]
        loops.start()
        loops.procs[1].wait(timeout=120)
        assert loops.procs[1].returncode != 0
        assert f"already finished at step {STEPS} (parameter digest {digest})".encode() in loops.log(1)
    finally:
        loops.close()
        job.close()


def test_a_torch_ddp_method_under_a_coordinator_is_refused_with_the_kinds_that_can(monkeypatch):
    monkeypatch.setenv("DISTTRAIN_SECRET", "s" * 32)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="'ddp-hook' cannot change membership.*per-step or local-step method"):
        disttrain.Session(model, torch.optim.AdamW(model.parameters()), "ddp-hook", coordinator="tcp://127.0.0.1:1")

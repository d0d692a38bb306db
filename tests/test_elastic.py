"""Elastic membership with real processes, real sockets and the real coordinator."""

import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from tiny import TINY_FLAGS, TINY_PER_STEP_FLAGS

from disttrain.launcher.elastic_job import ElasticJob


@pytest.fixture
def job(tmp_path):
    job = ElasticJob(tmp_path, TINY_PER_STEP_FLAGS)
    yield job
    job.close()


def start(job: ElasticJob, workers: int = 3) -> None:
    job.start_coordinator(start_workers=workers)
    for _ in range(workers):
        job.start_worker()


def test_survivors_of_a_kill_9_continue_in_the_same_processes_with_identical_parameters(job):
    start(job)
    job.wait_for_step(0, 40)
    job.signal(2, signal.SIGKILL)
    assert job.wait_for_exit([0, 1]) == [0, 0]
    summaries = job.assert_finished_identically([0, 1])
    assert summaries[0]["workers"] == 2
    assert b"regrouping" in job.log(0) or b"regrouping" in job.log(1)


@pytest.mark.slow  # 47 s; joiners at a round start stay in the default set (test_local_step_rounds_survive_...)
def test_a_worker_joining_mid_run_ends_with_identical_parameters(job):
    start(job)
    job.wait_for_step(0, 40)
    job.start_worker()
    assert job.wait_for_exit([0, 1, 2, 3]) == [0, 0, 0, 0]
    summaries = job.assert_finished_identically([0, 1, 2, 3])
    assert summaries[0]["workers"] == 4
    # The donor is whichever member the new generation ranks first; the joiner received its state.
    assert any(b"sent to ranks" in job.log(index) for index in (0, 1, 2))
    assert b"received from rank" in job.log(3)


@pytest.mark.slow
def test_a_stopped_worker_is_evicted_and_rejoins_with_fresh_state_after_sigcont(job):
    start(job)
    job.wait_for_step(0, 40)
    job.signal(2, signal.SIGSTOP)
    stopped_at = job.latest_step(0)
    job.wait_for_step(0, stopped_at + 40)  # the others went on without it
    job.signal(2, signal.SIGCONT)
    assert job.wait_for_exit([0, 1, 2]) == [0, 0, 0]
    job.assert_finished_identically([0, 1, 2])
    assert b"evicted" in job.log(2)


@pytest.mark.slow
def test_workers_keep_training_while_the_coordinator_restarts(job):
    start(job)
    job.wait_for_step(0, 40)
    job.coordinator.kill()
    job.coordinator.wait()
    down_at = job.latest_step(0)
    job.wait_for_step(0, down_at + 20)  # progress with no coordinator
    job.start_coordinator(start_workers=3)
    assert job.wait_for_exit([0, 1, 2]) == [0, 0, 0]
    job.assert_finished_identically([0, 1, 2])


@pytest.mark.slow
def test_survivors_regroup_when_the_coordinator_and_a_worker_are_killed_together(job):
    """The survivors' failure reports went to the coordinator that died; they must reach the new one."""
    start(job)
    job.wait_for_step(0, 30)
    job.coordinator.send_signal(signal.SIGKILL)
    job.signal(2, signal.SIGKILL)
    job.coordinator.wait()
    time.sleep(2)
    job.start_coordinator(start_workers=3)
    assert job.wait_for_exit([0, 1], timeout_s=120) == [0, 0]
    job.assert_finished_identically([0, 1])


@pytest.mark.slow
def test_survivors_regroup_when_the_coordinator_is_killed_while_a_generation_forms(job):
    start(job)
    job.wait_for_step(0, 30)
    job.signal(2, signal.SIGKILL)
    time.sleep(0.3)  # the survivors have reported the failure; the next generation is forming
    job.coordinator.send_signal(signal.SIGKILL)
    job.coordinator.wait()
    time.sleep(2)
    job.start_coordinator(start_workers=2)
    assert job.wait_for_exit([0, 1], timeout_s=120) == [0, 0]
    job.assert_finished_identically([0, 1])


class StoreVandal:
    """A stranger connected to the coordinator's rendezvous store: for ``for_s`` after it first sees
    keys it did not see before, it overwrites every key it finds with 8 zero bytes, over and over."""

    def __init__(self, job: ElasticJob, for_s: float = 3.0):
        self.store = dist.TCPStore("127.0.0.1", job.store_port, is_master=False, timeout=timedelta(seconds=10))
        self.known = set(self.store.list_keys())
        self.for_s = for_s
        self.overwrites = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            keys = [key for key in self.store.list_keys() if not key.startswith("disttrain/")]
            fresh = set(keys) - self.known
            if fresh and deadline is None:
                deadline = time.monotonic() + self.for_s
            for key in fresh if deadline is not None else ():
                self.store.set(key, b"\0" * 8)
                self.overwrites += 1
            time.sleep(0.001)


@pytest.mark.slow
def test_garbage_written_into_the_store_while_a_generation_forms_fails_that_generation_and_crashes_no_one(job):
    start(job)
    job.wait_for_step(0, 30)
    vandal = StoreVandal(job)
    job.signal(2, signal.SIGKILL)
    vandal.thread.join(timeout=120)
    assert vandal.overwrites > 0
    assert job.wait_for_exit([0, 1], timeout_s=180) == [0, 0]
    job.assert_finished_identically([0, 1])
    assert b"not signed with the job secret" in job.log(0) + job.log(1)


def test_a_worker_without_the_job_secret_is_told_why_once_and_the_coordinator_survives(job):
    job.start_coordinator()
    job.start_worker(secret="wrong-secret-wrong-secret-wrong")
    deadline = time.monotonic() + 120
    while b"fail authentication" not in job.log(0):
        assert time.monotonic() < deadline and job.workers[0].poll() is None, job.log(0).decode()[-3000:]
        time.sleep(0.1)
    time.sleep(2)  # eight more refused heartbeats
    assert job.log(0).count(b"unusable answer") == 1 and b"DISTTRAIN_SECRET" in job.log(0)
    assert job.coordinator.poll() is None
    assert job.coordinator_log().decode().count("bad signature") == 1


@pytest.mark.slow  # 10 s; a user loop joining a finished job stays in the default set
def test_a_worker_that_joins_after_the_last_step_is_told_the_job_finished_and_exits_0(tmp_path):
    job = ElasticJob(tmp_path, TINY_PER_STEP_FLAGS, steps=20)
    try:
        start(job, workers=2)
        assert job.wait_for_exit([0, 1]) == [0, 0]
        digest = job.summary(0)["parameter_digest"]
        assert job.start_worker().wait(timeout=120) == 0
        assert f"already finished at step 20 (parameter digest {digest})".encode() in job.log(2)
        log = job.coordinator_log().decode()
        assert log.count("left (run finished)") == 2 and "must be replaced" not in log
        assert log.count(f"finished at step 20 (parameter digest {digest})") == 1
    finally:
        job.close()


@pytest.mark.slow
def test_a_worker_cut_off_until_after_the_end_is_told_the_job_finished_and_exits_0(job):
    start(job)
    job.wait_for_step(0, 40)
    job.signal(2, signal.SIGSTOP)  # silent like a partitioned worker: no reset reaches the others
    assert job.wait_for_exit([0, 1]) == [0, 0]
    digest = job.summary(0)["parameter_digest"]
    job.signal(2, signal.SIGCONT)  # the link heals after the run ended
    assert job.wait_for_exit([2], timeout_s=120) == [0]
    assert f"already finished at step {job.steps} (parameter digest {digest})".encode() in job.log(2)


def test_torchrun_processes_join_through_the_coordinator(job):
    job.start_coordinator(start_workers=2)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "disttrain.launcher", "--coordinator", job.address, "--steps", "6", "--eval_every", "3",
            *TINY_PER_STEP_FLAGS,
        ],
        env=job.env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"workers": 2' in result.stdout


@pytest.mark.slow  # 10 s
def test_adaptive_refresh_renews_svd_bases_on_every_worker_at_the_same_step(tmp_path):
    job = ElasticJob(tmp_path, TINY_PER_STEP_FLAGS, steps=60, link_mbit=2.0)
    try:
        job.start_coordinator(start_workers=2, extra=["--refresh", "adaptive", "--energy-threshold", "0.999"])
        job.start_worker()
        job.start_worker()
        assert job.wait_for_exit([0, 1]) == [0, 0]
        job.assert_finished_identically([0, 1])
        refresh_steps = [re.findall(rb"refreshing the SVD bases at step (\d+)", job.log(i)) for i in (0, 1)]
        assert refresh_steps[0] and refresh_steps[0] == refresh_steps[1]
        assert b"refresh 1 requested" in (tmp_path / "coordinator-1.log").read_bytes()
    finally:
        job.close()


@pytest.mark.slow
def test_local_step_rounds_survive_a_kill_and_admit_a_joiner_at_a_round_start(tmp_path):
    job = ElasticJob(tmp_path, [*TINY_FLAGS, "--method", "diloco-int8-h30", "--local_steps", "4"], steps=160)
    try:
        start(job)
        job.wait_for_step(0, 40)
        job.signal(2, signal.SIGKILL)
        job.wait_for_step(0, job.latest_step(0) + 12)
        job.start_worker()
        assert job.wait_for_exit([0, 1, 3]) == [0, 0, 0]
        summaries = job.assert_finished_identically([0, 1, 3])
        assert summaries[0]["workers"] == 3
        # The joiner issues the survivors' collectives in their order (a deferred evaluation included):
        # nothing fails after the kill's one regroup, and no collective waits for its timeout.
        assert [job.log(i).count(b"regrouping") for i in (0, 1, 3)] == [1, 1, 0]
    finally:
        job.close()


@pytest.mark.parametrize("method", [
    "diloco-sparse-k4-h5-overlap-eager", pytest.param("diloco-sparse-k4-h5-overlap", marks=pytest.mark.slow),
])
def test_overlapped_rounds_survive_a_kill_and_admit_a_joiner_at_a_drain(tmp_path, method):
    """The survivors drop the exchange in flight and go on from the global weights; the joiner comes in
    where every member holds them (a drain: every 10 rounds)."""
    job = ElasticJob(tmp_path, [*TINY_FLAGS, "--method", method, "--local_steps", "2"], steps=160, link_mbit=0.03)
    try:
        start(job)
        job.wait_for_step(0, 30)
        job.signal(2, signal.SIGKILL)
        job.start_worker()
        assert job.wait_for_exit([0, 1, 3]) == [0, 0, 0]
        summaries = job.assert_finished_identically([0, 1, 3])
        assert summaries[0]["workers"] == 3
        assert [job.log(i).count(b"regrouping") for i in (0, 1, 3)] == [1, 1, 0]
        joined_at = int(re.search(rb"state of step (\d+) received", job.log(3)).group(1))
        assert 30 < joined_at < 160  # mid-run, at a drain (drains count rounds; the dropped one shifted them)
    finally:
        job.close()


def test_nodes_leave_as_a_unit_and_a_joining_node_receives_its_state_local_rank_by_local_rank(tmp_path):
    """2 nodes x 2 processes (torch DDP inside each): a process killed takes its node out, the other
    node goes on, and a new node comes in, each of its processes taking the state of its own share
    from the same local rank of the donor node."""
    job = ElasticJob(tmp_path, [*TINY_FLAGS, "--method", "diloco-sparse-k4-h5", "--inner", "ddp"], steps=600, link_mbit=0.03)
    try:
        job.start_coordinator(start_workers=2)
        first, second = job.start_node(2), job.start_node(2)
        job.wait_for_step(first[0], 30)
        job.signal(second[1], signal.SIGKILL)
        joiner = job.start_node(2)
        assert job.wait_for_exit([second[0]]) == [1]
        assert b"left the job with its node" in job.log(second[0])
        assert job.wait_for_exit(first + joiner) == [0, 0, 0, 0]
        summaries = job.assert_finished_identically(first + joiner)
        assert summaries[0]["workers"] == 2 and summaries[0]["processes_per_worker"] == 2
        donors = [re.search(rb"received from rank (\d+)", job.log(index)).group(1) for index in joiner]
        assert donors == [b"0", b"1"]  # the surviving node's local ranks 0 and 1 hold ranks 0 and 1
    finally:
        job.close()

"""A worker's agent against a real coordinator process: what it waits for, when it gives up, what it says."""

import logging
import re
import time

import pytest

from disttrain.elastic import agent as agent_module
from disttrain.elastic.agent import Agent, CoordinatorUnreachable, GenerationTimeout, JobFinished, View
from disttrain.elastic.protocol import SECRET_ENV
from disttrain.launcher.elastic_job import ElasticJob
from disttrain.launcher.local import free_port

JOB = "agent-test"


@pytest.fixture(autouse=True)
def quick_reports(monkeypatch):
    monkeypatch.setattr(agent_module, "REPORT_EVERY_S", 0.5)


@pytest.fixture
def job(tmp_path):
    job = ElasticJob(tmp_path, [])
    yield job
    job.close()


def serve(job: ElasticJob, start_workers: int = 1) -> None:
    """Start the coordinator of job JOB and wait until it listens."""
    job.start_coordinator(start_workers=start_workers, extra=["--job", JOB])
    job.wait_until_serving()


def agent(address: str, secret: str, job: str = JOB, connect_timeout_s: float = 2.0) -> Agent:
    started = Agent(address, secret.encode(), job, "cfg", connect_timeout_s=connect_timeout_s)
    started.start()
    return started


def active(view: View) -> bool:
    return view.status == "active"


def agent_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "disttrain.elastic.agent"]


def logged(caplog, pattern: str) -> bool:
    return any(re.fullmatch(pattern, line) for line in agent_lines(caplog))


def test_a_worker_gives_up_on_an_address_where_nothing_answers_saying_so(caplog):
    address = f"tcp://127.0.0.1:{free_port()}"
    waiter = agent(address, "s" * 32)
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(CoordinatorUnreachable, match="in 2 s: nothing answered") as error:
        waiter.wait_for_view(active, timeout_s=600)
    waiter.stop(leave=False)
    assert time.monotonic() - started < 10
    assert address in str(error.value)
    waiting = re.escape(f"waiting for the coordinator at {address}: no usable answer for ")
    assert logged(caplog, waiting + r"[0-9]+ s \(giving up in [0-9]+ s\)")


def test_a_coordinator_under_another_secret_is_named_once_then_given_up_on(job, caplog):
    serve(job)
    waiter = agent(job.address, "another-secret-of-32-characters!")
    with caplog.at_level(logging.INFO), pytest.raises(CoordinatorUnreachable, match="fail authentication.*DISTTRAIN_SECRET"):
        waiter.wait_for_view(active, timeout_s=600)
    waiter.stop(leave=False)
    warnings = [line for line in agent_lines(caplog) if line.startswith("unusable answer")]
    assert len(warnings) == 1 and "another secret" in warnings[0]
    assert job.coordinator_log().count(b"bad signature") == 1  # about 8 refusals, one line


def test_a_coordinator_of_another_job_is_named_with_both_job_ids(job, caplog):
    serve(job)
    waiter = agent(job.address, job.env[SECRET_ENV], job="mine")
    with caplog.at_level(logging.INFO), pytest.raises(CoordinatorUnreachable) as error:
        waiter.wait_for_view(active, timeout_s=600)
    waiter.stop(leave=False)
    assert f"a coordinator of job {JOB!r} answered, this worker is for job 'mine'" in str(error.value)
    assert sum(line.startswith("unusable answer") for line in agent_lines(caplog)) == 1


@pytest.mark.parametrize("address", ["127.0.0.1:29400", "tcp://127.0.0.1", "tcp://127.0.0.1:65536", "tcp://host:port"])
def test_a_malformed_address_is_refused_by_the_constructor(address):
    with pytest.raises(ValueError, match=f"{address!r} is malformed: use tcp://HOST:PORT"):
        Agent(address, b"s" * 32, JOB, "cfg")


def test_waiting_for_a_quorum_is_not_unreachable_and_says_how_many_have_joined(job, caplog):
    serve(job, start_workers=2)
    first = agent(job.address, job.env[SECRET_ENV], connect_timeout_s=1.0)
    with caplog.at_level(logging.INFO), pytest.raises(GenerationTimeout, match="within 3 s: 1 of 2 workers have joined"):
        first.wait_for_view(active, timeout_s=3.0)  # longer than the connect timeout: the coordinator answers
    assert logged(caplog, r"waiting for generation 1: 1 of 2 workers have joined \(giving up in [12] s\)")
    second = agent(job.address, job.env[SECRET_ENV])
    views = [waiter.wait_for_view(active, timeout_s=30) for waiter in (first, second)]
    assert [view.gen for view in views] == [1, 1] and set(views[0].roster) == {first.worker_id, second.worker_id}
    for waiter in (first, second):
        waiter.stop()


def test_a_worker_that_joins_after_the_job_finished_is_told_so_with_the_step_and_digest(job):
    serve(job)
    member = agent(job.address, job.env[SECRET_ENV])
    member.wait_for_view(active, timeout_s=30)
    member.mark_finished(7, "0123abcd")
    member.stop(leave=True)
    for _ in range(2):
        late = agent(job.address, job.env[SECRET_ENV])
        with pytest.raises(JobFinished, match="already finished at step 7 \\(parameter digest 0123abcd\\)") as finished:
            late.wait_for_view(active, timeout_s=600)
        late.stop()
        assert (finished.value.step, finished.value.digest) == (7, "0123abcd")
    log = job.coordinator_log().decode()
    assert f"worker {member.name} left (run finished)" in log and "must be replaced" not in log
    assert log.count(f"job {JOB!r} finished at step 7") == 1 and log.count("that the job finished at step 7") == 2

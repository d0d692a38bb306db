"""The control plane under ZMQ CURVE: a real `disttrain coordinator --curve-keys` process, agents on
real sockets, and a relay between them that records what a passive observer on the wire would see."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading

import pytest
from tiny import TINY_FLAGS

from disttrain.elastic import curve
from disttrain.elastic.agent import Agent, CoordinatorUnreachable, View
from disttrain.elastic.curve import CurveKeyError, coordinator_keys, coordinator_public_key
from disttrain.elastic.protocol import SECRET_ENV
from disttrain.launcher.elastic_job import ElasticJob
from disttrain.launcher.local import free_port

JOB = "curve-test"


class WireTap:
    """A TCP relay from a local port to the coordinator that keeps a copy of every byte both ways."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def job(tmp_path):
    job = ElasticJob(tmp_path, [])
    yield job
    job.close()


def serve(job: ElasticJob, keys: str | None) -> WireTap:
    job.start_coordinator(extra=["--job", JOB, *(["--curve-keys", keys] if keys else [])])
    job.wait_until_serving()
    return WireTap(job.port)


def agent(job: ElasticJob, port: int, key: bytes | None, connect_timeout_s: float = 20.0) -> Agent:
    started = Agent(f"tcp://127.0.0.1:{port}", job.env[SECRET_ENV].encode(), JOB, "cfg", connect_timeout_s=connect_timeout_s, coordinator_key=key)
    started.start()
    return started


def active(view: View) -> bool:
    return view.status == "active"


def test_the_coordinator_makes_its_key_pair_on_first_use_and_keeps_it(tmp_path):
    first = coordinator_keys(tmp_path / "keys")
    assert coordinator_keys(tmp_path / "keys") == first
    assert stat.S_IMODE((tmp_path / "keys" / curve.SECRET_KEY_FILE).stat().st_mode) == 0o600
    assert coordinator_public_key(str(tmp_path / "keys" / curve.PUBLIC_KEY_FILE)) == first[0]
    assert coordinator_public_key(first[0].decode()) == first[0]


@pytest.mark.parametrize("value", ["no-such-file", "~" * 40, "/"])
def test_a_coordinator_key_that_is_neither_a_key_file_nor_z85_is_refused_with_the_fix(value):
    with pytest.raises(CurveKeyError, match="coordinator.key"):
        coordinator_public_key(value)


def test_with_curve_a_worker_is_admitted_and_an_observer_reads_neither_the_job_nor_the_worker_id(job, tmp_path):
    keys = tmp_path / "keys"
    tap = serve(job, str(keys))
    member = agent(job, tap.port, coordinator_public_key(str(keys)))
    try:
        assert member.wait_for_view(active, timeout_s=30).roster == (member.worker_id,)
    finally:
        member.stop()
        tap.close()
    assert len(tap.seen) > 1000  # heartbeats and views went through the tap
    for secret in (JOB.encode(), member.worker_id.encode(), b"heartbeat", b"roster"):
        assert secret not in tap.seen


def test_without_curve_the_same_observer_reads_the_job_and_the_worker_id(job):
    tap = serve(job, None)
    member = agent(job, tap.port, None)
    try:
        member.wait_for_view(active, timeout_s=30)
    finally:
        member.stop()
        tap.close()
    assert JOB.encode() in tap.seen and member.worker_id.encode() in tap.seen


@pytest.mark.slow
def test_a_worker_without_the_coordinators_public_key_gets_no_answer_and_is_told_why(job, tmp_path):
    serve(job, str(tmp_path / "keys"))
    members = [agent(job, job.port, key, connect_timeout_s=2.0) for key in (None, coordinator_keys(tmp_path / "other")[0])]
    try:
        for member in members:  # no key, and another coordinator's
            with pytest.raises(CoordinatorUnreachable, match="--coordinator-key"):
                member.wait_for_view(active, timeout_s=30)
    finally:
        for member in members:
            member.stop()
    assert job.coordinator.poll() is None


@pytest.mark.slow
def test_doctor_shakes_hands_through_curve_with_the_key_and_says_what_to_do_without(job, tmp_path):
    keys = tmp_path / "keys"
    serve(job, str(keys))
    common = ["disttrain", "doctor", "--coordinator", job.address, "--job", JOB, "--store-port", str(job.store_port)]
    with_key = subprocess.run([*common, "--coordinator-key", str(keys / curve.PUBLIC_KEY_FILE)], env=job.env, capture_output=True, text=True, timeout=120)
    without = subprocess.run(common, env=job.env, capture_output=True, text=True, timeout=120)
    assert "OK    handshake" in with_key.stdout, with_key.stdout
    assert "FAIL  handshake" in without.stdout and "--coordinator-key" in without.stdout, without.stdout


def test_train_refuses_a_missing_coordinator_key_before_starting_any_worker(tmp_path):
    result = subprocess.run(
        ["disttrain", "train", "--nproc", "2", "--coordinator", f"tcp://127.0.0.1:{free_port()}", "--coordinator-key", str(tmp_path / "nope.key")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "--coordinator-key" in result.stderr and "coordinator.key" in result.stderr


def test_train_reads_the_coordinator_key_from_the_environment_and_refuses_a_bad_one_before_starting(tmp_path):
    env = {**os.environ, curve.COORDINATOR_KEY_ENV: str(tmp_path / "nope.key")}
    result = subprocess.run(
        ["disttrain", "train", "--nproc", "2", "--coordinator", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "nope.key" in result.stderr, result.stderr


def test_a_coordinator_given_a_file_for_its_key_folder_refuses_to_start(tmp_path):
    (tmp_path / "file").write_text("x")
    result = subprocess.run(
        ["disttrain", "coordinator", "--bind", f"tcp://127.0.0.1:{free_port()}", "--curve-keys", str(tmp_path / "file")],
        capture_output=True, text=True, timeout=60, env={**os.environ, SECRET_ENV: "0" * 32},
    )
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_elastic_job_trains_to_the_end_through_curve_with_identical_replicas(tmp_path):
    job = ElasticJob(tmp_path, TINY_FLAGS, steps=20)
    keys = tmp_path / "keys"
    try:
        job.start_coordinator(start_workers=2, extra=["--curve-keys", str(keys)])
        job.wait_until_serving()
        for _ in range(2):
            job.start_worker(extra=["--coordinator-key", str(keys / curve.PUBLIC_KEY_FILE)])
        assert job.wait_for_exit([0, 1], timeout_s=240) == [0, 0]
        job.assert_finished_identically([0, 1])
    finally:
        job.close()
    assert b"encrypted (CURVE)" in job.coordinator_log()


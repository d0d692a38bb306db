"""``disttrain doctor``: each check's verdict on a broken setting, and a real coordinator."""

import os
import socket
import subprocess
import threading
import time

import pytest
import torch

from disttrain import doctor
from disttrain.doctor import FAIL, OK, WARN, Answer, DoctorConfig
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig
from disttrain.elastic.curve import COORDINATOR_KEY_ENV
from disttrain.elastic.protocol import SECRET_ENV
from disttrain.launcher.local import free_port

SECRET = "0123456789abcdef0123456789abcdef"
UNSET = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DISTTRAIN_KERNELS")


@pytest.fixture
def coordinator():
    """A real coordinator serving in this process; yields its address and store port."""
    config = CoordinatorConfig(bind=f"tcp://127.0.0.1:{free_port()}", job="doctored", store_port=free_port())
    stop = threading.Event()
    thread = threading.Thread(target=Coordinator(config, SECRET.encode()).serve, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while doctor.check_coordinator("127.0.0.1", config.port, 1.0).status != OK and time.monotonic() < deadline:
        time.sleep(0.05)
    yield config
    stop.set()
    thread.join(timeout=5)


def statuses(checks: list[doctor.Check]) -> dict[str, str]:
    return {check.name: check.status for check in checks}


def test_a_healthy_machine_exits_0_and_reports_every_check():
    env = {k: v for k, v in os.environ.items() if k not in UNSET} | {SECRET_ENV: SECRET}
    result = subprocess.run(["disttrain", "doctor"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("python", "torch", "distributed", "triton", "cuda", "interfaces", "hostname", "secret", "clock"):
        assert f"  {name} " in result.stdout
    assert result.stdout.rstrip().endswith(" 0 FAIL")


def test_a_running_coordinator_passes_every_network_check(coordinator, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    checks = doctor.run_checks(DoctorConfig(coordinator.bind, coordinator.store_port, coordinator.job))
    network = {name: status for name, status in statuses(checks).items() if name in ("coordinator", "store", "handshake", "clock skew")}
    assert network == {"coordinator": OK, "store": OK, "handshake": OK, "clock skew": OK}


def test_a_bad_coordinator_key_in_the_environment_is_a_failed_check_not_a_crash(coordinator, monkeypatch, tmp_path):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(COORDINATOR_KEY_ENV, str(tmp_path / "nope.key"))
    checks = doctor.run_checks(DoctorConfig(coordinator.bind, coordinator.store_port, coordinator.job))
    (key,) = [check for check in checks if check.name == "coordinator key"]
    assert key.status == FAIL and f"${COORDINATOR_KEY_ENV}" in key.detail and "nope.key" in key.detail


def test_a_coordinator_with_another_secret_fails_the_handshake_and_says_to_share_it(coordinator):
    answer = doctor.ask_coordinator(coordinator.bind, b"another-secret-another-secret", coordinator.job, 2.0)
    check = doctor.check_handshake(answer, coordinator.bind, coordinator.job)
    assert check.status == FAIL and "bad signature" in check.detail and SECRET_ENV in check.fix


def test_an_unreachable_coordinator_fails_naming_the_address_and_how_to_start_it():
    port = free_port()  # bound and released: nothing listens there
    check = doctor.check_coordinator("127.0.0.1", port, 1.0)
    assert check.status == FAIL and f"127.0.0.1:{port}" in check.detail
    assert f"disttrain coordinator --bind tcp://0.0.0.0:{port}" in check.fix


def test_a_coordinator_clock_beyond_the_protocols_skew_limit_fails():
    now = time.time()
    check = doctor.check_clock_skew(Answer({"ts": now + 120.0}, None, now, now + 0.01))
    assert check.status == FAIL and "+119.99" in check.detail


@pytest.mark.parametrize(
    ("variable", "value", "status"),
    [
        ("GLOO_SOCKET_IFNAME", "nosuchif0", FAIL),
        ("GLOO_SOCKET_IFNAME", "lo", OK),
        ("GLOO_SOCKET_IFNAME", "l", FAIL),  # Gloo wants exact names
        ("NCCL_SOCKET_IFNAME", "l", OK),  # NCCL matches prefixes
        ("NCCL_SOCKET_IFNAME", "=l", FAIL),  # unless told '=' (exact)
        ("NCCL_SOCKET_IFNAME", "^nosuchif", OK),  # an exclusion cannot be wrong
    ],
)
def test_socket_ifname_variables_must_name_interfaces_of_this_machine(monkeypatch, variable, value, status):
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    check = doctor.check_interfaces()
    assert check.status == status, check.detail
    assert status == OK or value.lstrip("=") in check.detail


@pytest.mark.parametrize(
    ("secret", "file", "required", "status"),
    [
        (None, None, False, WARN),  # nothing to join yet: `disttrain demo` makes its own
        (None, None, True, FAIL),  # a coordinator was named: it cannot be talked to
        ("short", None, False, FAIL),
        (None, "missing", False, FAIL),
        (None, "good", True, OK),
        (SECRET, None, True, OK),
    ],
)
def test_the_job_secret_must_load_and_be_16_bytes_or_more(monkeypatch, tmp_path, secret, file, required, status):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    if secret is not None:
        monkeypatch.setenv(SECRET_ENV, secret)
    path = None
    if file is not None:
        path = tmp_path / file
        if file == "good":
            path.write_text(SECRET + "\n")
    check = doctor.check_secret(None if path is None else str(path), required)
    assert check.status == status, check.detail
    assert status == OK or "openssl rand" in check.fix + check.detail


def test_the_report_gives_a_fix_only_for_what_is_not_ok():
    checks = [doctor.Check("a", OK, "fine", "unused"), doctor.Check("b", FAIL, "broken", "mend it")]
    assert doctor.report(checks) == "OK    a            fine\nFAIL  b            broken\n                   fix: mend it\n1 OK, 0 WARN, 1 FAIL\n"


def test_a_hostname_that_resolves_only_to_loopback_warns_unless_gloo_is_told_an_interface(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_: [(socket.AF_INET, 0, 0, "", ("127.0.1.1", 0))])
    assert doctor.check_hostname().status == WARN
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert doctor.check_hostname().status == OK


def test_the_cuda_check_says_where_device_auto_trains(monkeypatch):
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor.torch.version, "cuda", None)
    check = doctor.check_cuda()
    assert check.status == OK and check.detail == "no CUDA in this torch build: --device auto trains on the CPU"
    monkeypatch.setattr(doctor.torch.version, "cuda", "13.0")
    check = doctor.check_cuda()
    assert check.status == WARN and "sees no device: --device auto trains on the CPU" in check.detail
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(doctor.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(doctor.torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(doctor, "gpu_probe", lambda device: "Triton")
    check = doctor.check_cuda()
    assert check.status == OK and check.detail.startswith("1 device(s): NVIDIA H200; --device auto trains on them")
    assert "the vote kernels (Triton) ran on NVIDIA H200" in check.detail


def test_a_gpu_that_fails_the_probe_is_a_failed_check(monkeypatch):
    def broken(device):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(doctor.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(doctor.torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(doctor, "gpu_probe", broken)
    check = doctor.check_cuda()
    assert check.status == FAIL and "no kernel image" in check.detail and "DISTTRAIN_KERNELS=torch" in check.fix


def test_the_gpu_probe_runs_a_bf16_step_and_the_vote_kernels_on_the_cpu_too():
    assert doctor.gpu_probe(torch.device("cpu")) == "torch reference"

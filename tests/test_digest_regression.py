"""The training path keeps its results bit for bit: these digests were recorded by the code
before the training loop was rebuilt on the shared session object (issue 18), for the same
config and seed. A change that alters them changes every benchmark's numbers.

The power-step method's QR goes through the CPU's own LAPACK kernels, so its digest is recorded per
CPU vendor (the same code gives another one on Intel than on AMD); a CPU without a recorded digest
skips the test and says so."""

import json
import platform
import subprocess
import sys

import pytest
from tiny import TINY_FLAGS

RECORDED = {
    "diloco-sparse-k4-h5": {"AuthenticAMD": "b20512094d12476f", "GenuineIntel": "b20512094d12476f"},
    "power-int4-r16": {"AuthenticAMD": "35136f283fe43d3b", "GenuineIntel": "696444e109ff853f"},
}


def cpu_vendor() -> str:
    """The CPU's vendor string as Linux reports it (GenuineIntel, AuthenticAMD), else the machine name."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return platform.machine()


def recorded_digest(method: str) -> str:
    """The digest recorded for ``method`` on this machine's kind of CPU; skips the test where there is none."""
    recorded = RECORDED[method].get(cpu_vendor())
    if recorded is None:
        pytest.skip(f"no {method} digest recorded for a {cpu_vendor()} CPU: run test_digest_regression's command and record it")
    return recorded


@pytest.mark.parametrize("method", RECORDED)
def test_two_workers_end_with_the_recorded_parameter_digest(method):
    recorded = recorded_digest(method)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "disttrain.launcher", "--method", method, "--steps", "20", "--eval-every", "10", *TINY_FLAGS,
        ],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["parameter_digest"] == recorded

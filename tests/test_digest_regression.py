"""The training path keeps its results bit for bit: these digests were recorded by the code
before the training loop was rebuilt on the shared session object (issue 18), for the same
config and seed. A change that alters them changes every benchmark's numbers."""

import json
import subprocess
import sys

import pytest
from tiny import TINY_FLAGS

RECORDED = {"diloco-sparse-k4-h5": "b20512094d12476f", "power-int4-r16": "35136f283fe43d3b"}


@pytest.mark.parametrize("method", RECORDED)
def test_two_workers_end_with_the_recorded_parameter_digest(method):
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "disttrain.launcher", "--method", method, "--steps", "20", "--eval-every", "10", *TINY_FLAGS,
        ],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["parameter_digest"] == RECORDED[method]

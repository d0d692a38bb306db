"""The README's demo, end to end with its defaults (slow: about 3 minutes on 2 cores)."""

import json
import subprocess

import pytest


@pytest.mark.slow
def test_default_demo_learns_and_sends_150x_fewer_bytes_than_dense():
    result = subprocess.run(["disttrain", "demo"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 4 and summary["replicas_identical"] is True
    assert summary["dense_bytes_per_step"] / summary["bytes_per_step"] >= 150
    assert summary["val_loss"] < 2.6  # from 5.5 at initialisation

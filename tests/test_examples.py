"""The drop-in examples run as users run them: torchrun with 2 processes over Gloo."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def torchrun(script: str, *args: str, first_key: str = "first_loss") -> dict:
    """Run ``examples/<script>`` with ``torchrun --standalone --nproc-per-node 2``; its JSON summary
    (the last JSON object in its output that starts with ``first_key``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=240, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # Searched for, not taken by line: another process's stderr may share the summary's line.
    return json.loads(re.findall(r'\{"' + first_key + r'".*?\}', output)[-1])


@pytest.mark.parametrize("script, method", [("ddp_comm_hook.py", []), ("own_loop_rounds.py", ["--method", "power-int4-r16"])])
def test_example_trains_compressed_with_identical_replicas(script, method):
    summary = torchrun(script, "--steps", "30", *method)
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    assert summary["bytes_per_step"] < summary["dense_bytes_per_step"] / 50
    assert summary["replicas_identical"]


@pytest.mark.slow
def test_federated_example_fine_tunes_the_pretrained_model_with_identical_clients():
    summary = torchrun("federated_minilm.py", "--steps", "20", "--layers", "1", first_key="method")
    assert summary["method"] == "fedavg-votes-k1-h13"
    assert summary["bytes_sent_per_client"] < summary["dense_fedavg_bytes"] / 100
    assert summary["replicas_identical"]


def test_own_loop_with_the_default_local_step_method_ends_with_identical_replicas():
    summary = torchrun("own_loop_rounds.py", "--steps", "40")
    assert summary["method"] == "diloco-sparse-k4-h5"
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    assert summary["compression_ratio"] >= 1000 and summary["bytes_per_step"] > 0
    assert summary["replicas_identical"]

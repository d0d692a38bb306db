"""disttrain issues its collectives in the same order on every rank: with many buckets in flight
on a slow tbf-capped link, gradients arriving in different orders do not mix up collectives
(the failure that torch's powerSGD_hook shows there). Needs root and iproute2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.append(str(TESTS.parent / "benchmarks"))

from netlab import HOST_INTERFACE, NetLab, missing_requirements  # noqa: E402

from disttrain.launcher.local import worker_env  # noqa: E402

pytestmark = pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {'; '.join(missing_requirements())}")


@pytest.mark.parametrize("payload", ["fp32", "int8"])
def test_many_buckets_on_a_capped_link_agree_although_gradients_arrive_in_different_orders(payload):
    lab = NetLab(hosts=2, rate_mbit=2.0, prefix=f"dtorder{os.getpid()}")
    lab.setup()
    try:
        procs = []
        for rank in range(2):
            env = worker_env(rank, 2, 29500)
            env.update(MASTER_ADDR=lab.address(0), GLOO_SOCKET_IFNAME=HOST_INTERFACE, PYTHONPATH=str(TESTS))
            command = lab.in_namespace(lab.host(rank), [sys.executable, str(TESTS / "ordering_worker.py"), payload])
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        lab.teardown()
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["buckets"] >= 6
    assert results[0]["arrival"] != results[1]["arrival"]
    assert results[0]["digest"] == results[1]["digest"]

"""The cluster benchmark: the command lines it builds, the numbers it derives, the table it
writes, and (as root with iproute2) a real run of its small mode in network namespaces."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "benchmarks"))

import cluster  # noqa: E402
import netlab  # noqa: E402
from netlab import NetLab, missing_requirements  # noqa: E402


def history(*points):
    return [{"step": s, "val_loss": v, "wall_s": t, "total_bytes": b} for s, v, t, b in points]


def small_settings(**overrides) -> cluster.Settings:
    values = dict(workers=4, steps=40, eval_every=10, target_step=20, headline_mbit=20.0,
                  calibration_steps=20, max_run_s=100.0, small=True)
    return cluster.Settings(**{**values, **overrides})


def test_every_link_is_capped_in_both_directions():
    commands = NetLab(hosts=2, rate_mbit=20.0, prefix="t").setup_commands()
    caps = [c for c in commands if c[0] == "tc"]
    assert [(c[2], c[6]) for c in caps] == [("t-h0", "eth0"), ("t-hub", "p0"), ("t-h1", "eth0"), ("t-hub", "p1")]
    assert all(c[c.index("rate") + 1] == "20mbit" for c in caps)


@pytest.mark.parametrize("rate_mbit", [0.117, 1.17, 20.0, 100.0])
def test_the_link_bucket_holds_milliseconds_of_traffic_not_seconds(rate_mbit):
    burst = netlab.tbf_burst_bytes(rate_mbit)
    assert burst >= netlab.TBF_MIN_BURST_BYTES
    assert burst * 8 / (rate_mbit * 1e6) <= max(netlab.TBF_BURST_S, netlab.TBF_MIN_BURST_BYTES * 8 / (rate_mbit * 1e6))
    cap = next(c for c in NetLab(hosts=1, rate_mbit=rate_mbit, prefix="t").setup_commands() if c[0] == "tc")
    assert cap[cap.index("burst") + 1] == f"{burst}b"


@pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {'; '.join(missing_requirements())}")
def test_a_link_left_idle_does_not_send_a_backlog_at_once():
    """After a pause, 40 kB at 0.4 Mbit/s takes its 0.8 s, not the instant a large bucket would allow."""
    lab = NetLab(hosts=2, rate_mbit=0.4, prefix="tidle")
    lab.setup()
    receiver_code = (
        "import socket\ns = socket.create_server(('0.0.0.0', 5601))\nc, _ = s.accept()\nn = 0\n"
        "while n < 40000:\n    n += len(c.recv(65536))\nc.sendall(b'k')\n"
    )
    sender_code = (
        f"import socket, time\ns = socket.create_connection(('{lab.address(1)}', 5601))\ntime.sleep(2)\n"
        "t = time.monotonic()\ns.sendall(b'x' * 40000)\ns.recv(1)\nprint(time.monotonic() - t)\n"
    )
    try:
        receiver = subprocess.Popen(lab.in_namespace(lab.host(1), [sys.executable, "-c", receiver_code]))
        for _ in range(50):
            probe = subprocess.run(lab.in_namespace(lab.host(1), ["ss", "-ltn"]), capture_output=True, text=True)
            if ":5601" in probe.stdout:
                break
            time.sleep(0.1)
        sender = subprocess.run(lab.in_namespace(lab.host(0), [sys.executable, "-c", sender_code]),
                                capture_output=True, text=True, timeout=60)
        receiver.wait(timeout=30)
    finally:
        receiver.kill()
        lab.teardown()
    assert sender.returncode == 0, sender.stderr
    assert float(sender.stdout) >= 0.8 * 40000 * 8 / 0.4e6


def test_the_lab_creates_nothing_outside_its_own_namespaces():
    lab = NetLab(hosts=3, rate_mbit=None, prefix="t")
    for command in lab.setup_commands():
        if command[:3] == ["ip", "netns", "add"]:
            assert command[3] in lab.namespaces()
        else:
            assert command[1] == "-n" and command[2] in lab.namespaces(), command


def test_an_uncapped_lab_has_no_qdisc():
    assert not any(c[0] == "tc" for c in NetLab(hosts=2, rate_mbit=None).setup_commands())


def test_workers_run_in_their_namespace_with_gloo_on_the_lab_interface(tmp_path):
    lab, settings = NetLab(hosts=4, rate_mbit=20.0, prefix="t"), small_settings()
    env = cluster.worker_environment(2, lab, settings, "s" * 64)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["GLOO_SOCKET_IFNAME"]) == ("2", "4", "10.77.0.11", "eth0")
    flags = cluster.worker_flags(cluster.Run("svd-int8-reconstruct", 20.0, stop_at=30), settings, tmp_path / "s.json")
    assert flags[flags.index("--stop_at") + 1] == "30" and "--coordinator" not in flags
    elastic = cluster.worker_flags(cluster.Run("svd-int8-reconstruct", 20.0, elastic=True), settings, tmp_path / "s.json")
    assert elastic[elastic.index("--coordinator") + 1] == "tcp://10.77.0.1:29400"


def test_worker_flags_are_accepted_by_the_worker_parser(tmp_path):
    from disttrain.launcher.worker import build_parser

    run = cluster.Run("diloco-int8-h30", 20.0, elastic=True, stop_at=10)
    build_parser().parse_args(cluster.worker_flags(run, small_settings(), tmp_path / "s.json"))


def test_slow_ddp_is_stopped_early_and_fast_methods_are_not():
    limit = {"step_s": 0.5, "dense_bytes_per_step": 13_000_000}
    settings = small_settings(steps=200, eval_every=20, max_run_s=300.0)
    slow = cluster.early_stop(cluster.Run("ddp", 20.0), settings, limit)
    assert slow.stop_at is not None and slow.stop_at % 20 == 0 and slow.stop_at < 200
    assert cluster.early_stop(cluster.Run("svd-int8-reconstruct", 20.0), settings, limit).stop_at is None
    assert cluster.early_stop(cluster.Run("ddp", 1000.0), settings, limit).stop_at is None


def test_time_to_target_is_interpolated_between_evaluations():
    points = history((10, 3.0, 10.0, 100), (20, 2.0, 30.0, 200))
    assert cluster.interpolate_crossing(points, 2.5, "wall_s") == pytest.approx(20.0)
    assert cluster.interpolate_crossing(points, 1.0, "wall_s") is None


def record(method, rate, points, **extra):
    fields = cluster.summary_fields(
        {"steps": points[-1]["step"], "history": points, "val_loss": points[-1]["val_loss"],
         "wall_s": points[-1]["wall_s"], "bytes_per_step": 10.0, "wire_bytes_per_step": 15.0, "dense_bytes_per_step": 100,
         "replicas_identical": True},
        [1000, 1000],
    )
    return {"method": method, "rate_mbit": rate, "elastic": False, "stop_at": None, "label": method, **fields, **extra}


def test_derived_numbers_compare_every_run_with_the_limit_and_with_ddp_at_its_rate():
    settings = small_settings(steps=20, target_step=10)
    records = [
        record("ddp", None, history((10, 3.0, 10.0, 1000), (20, 2.0, 20.0, 2000))),
        record("svd-int8-reconstruct", None, history((10, 3.0, 10.0, 10), (20, 2.5, 20.0, 20))),
        record("ddp", 20.0, history((10, 3.5, 100.0, 1000)), stop_at=10),
        record("svd-int8-reconstruct", 20.0, history((10, 3.2, 11.0, 10), (20, 2.8, 25.0, 20))),
    ]
    derived = cluster.derive(records, settings)
    assert derived["target_val_loss"] == 3.0
    ddp20, ours = records[2], records[3]
    assert ddp20["extrapolated"] and ddp20["time_to_target_s"] == pytest.approx(10 * 10.0)
    assert ours["time_to_target_s"] == pytest.approx(11.0 + 0.5 * 14.0)
    assert ours["x_limit"] == pytest.approx(18.0 / 10.0)
    assert ours["x_faster_than_ddp"] == pytest.approx(100.0 / 18.0)
    assert ours["comm_share"] == pytest.approx(1 - 1.0 / 1.25)
    assert derived["targets"]["best"] == "svd-int8-reconstruct"


def test_the_table_is_made_from_the_results_file(tmp_path):
    settings = small_settings(steps=20, target_step=10)
    records = [
        record("ddp", None, history((10, 3.0, 10.0, 1000), (20, 2.0, 20.0, 2000))),
        record("powersgd-r4", 20.0, history((10, 3.2, 12.0, 300), (20, 3.1, 24.0, 600))),
    ]
    results = {"machine": {"cores": 2, "cpu": "test CPU", "torch": "x"}, "settings": vars(settings) | {},
               "command": "python benchmarks/cluster.py", **cluster.derive(records, settings), "runs": records}
    results["command"] = "python benchmarks/cluster.py --small --out /tmp/c.json --doc /tmp/b.md"
    table = cluster.render_table(json.loads(json.dumps(results)), REPO / "benchmarks" / "results" / "cluster.json")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| ddp | uncapped | 10 | 1.00 |")
    assert rows[1].startswith("| powersgd-r4 | 20 Mbit/s | not reached |")
    assert "no disttrain method reached the target" in table and "test CPU" in table
    assert table.endswith(
        "Generated by `python benchmarks/cluster.py --small` (results in benchmarks/results/cluster.json)."
    )


def test_the_table_goes_into_docs_benchmarks_md_by_default():
    assert cluster.parse_args([]).doc == REPO / "docs" / "benchmarks.md"


def test_the_benchmark_skips_with_what_is_missing_when_not_root(monkeypatch, caplog):
    monkeypatch.setattr(netlab, "missing_requirements", lambda: ["root (run as root)"])
    assert cluster.main(["--small"]) == 0
    assert "skipping the cluster benchmark: it needs root" in caplog.text


@pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {'; '.join(missing_requirements())}")
@pytest.mark.slow  # 21 s
def test_the_small_mode_runs_for_real_in_namespaces_and_cleans_up(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- cluster-table:start -->\n<!-- cluster-table:end -->\n")
    out = tmp_path / "cluster.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "cluster.py"), "--small", "--workers", "2", "--steps", "6",
        "--eval-every", "3", "--methods", "seeded-int8-reconstruct", "--no-elastic", "--out", str(out), "--doc", str(doc),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())
    capped = [r for r in results["runs"] if r["rate_mbit"] == 20.0]
    assert capped and all(r["replicas_identical"] and "error" not in r for r in capped)
    # A seeded basis costs no broadcast, so every worker sends its own payload, and the link carries at least that.
    assert all(r["wire_bytes_per_step"] > r["payload_bytes_per_step"] > 0 for r in capped)
    assert "| seeded-int8-reconstruct | 20 Mbit/s |" in doc.read_text()
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dtb" not in leftovers

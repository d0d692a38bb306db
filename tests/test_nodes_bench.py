"""The nodes benchmark's arithmetic and table, from synthetic run records (no network lab), and
the lab placement it relies on: a node's processes in one namespace, numbered node by node."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cluster  # noqa: E402
import nodes  # noqa: E402
from netlab import NetLab  # noqa: E402

RATES = (20.0, 10.0)


def history(step_s: float, *points: tuple[int, float]) -> list[dict]:
    return [{"step": step, "val_loss": loss, "wall_s": step * step_s, "total_bytes": 0} for step, loss in points]


def run_record(case: nodes.Case | None, role: str, rate: float | None = None, step_s: float = 0.5, tx: float = 0.0, **fields) -> dict:
    method, layout, inner = (case.method, case.layout, case.inner) if case else (cluster.LIMIT, fields.pop("layout"), "auto")
    base = {
        "method": method, "role": role, "layout": layout, "inner": inner, "case": case.label if case else None, "rate_mbit": rate,
        "stop_at": None, "steps_run": 120, "final_val_loss": 2.3, "payload_bytes_per_step": 1000, "wire_bytes_per_step": tx,
        "step_s": step_s, "history": history(step_s, (0, 5.0), (60, 2.6), (120, 2.3)),
        "held_bytes": {"parameters": 100, "optimizer": 200, "exchange": 300}, "peak_rss_bytes": 10_000_000,
    }
    return {**base, **fields}


def results() -> dict:
    runs = [run_record(None, "limit", layout=layout) for layout in nodes.LAYOUTS]
    runs += [run_record(case, "uncapped") for case in nodes.CASES if case.method != cluster.LIMIT]
    tx = {"inner ddp": 5_000.0, "inner fsdp": 5_000.0, "inner flat": 10_000.0}
    for rate in RATES:
        for case in nodes.CASES:
            if case.method == cluster.LIMIT:
                runs.append(run_record(case, "capped", rate, step_s=5.0, tx=3e6, stop_at=15,
                                       history=history(5.0, (0, 5.0), (15, 4.0))))
            else:
                runs.append(run_record(case, "capped", rate, step_s=0.625, tx=tx[f"inner {case.inner}"]))
    settings = {"steps": 120, "eval_every": 15, "target_step": 60, "processes": 4, "rates_mbit": list(RATES)}
    return {"machine": {"cores": 2, "cpu": "test", "torch": "2.13.0"}, "command": "python benchmarks/nodes.py",
            "settings": settings, "runs": runs}


def row(derived: dict, case: nodes.Case, rate: float) -> dict:
    return next(r for r in derived["rows"] if r["case"] == case.label and r["rate_mbit"] == rate)


def test_a_nodes_slow_link_bytes_are_compared_with_the_flat_layout_on_the_same_nodes():
    derived = nodes.derive(results())
    assert row(derived, nodes.Case("2x2", "ddp"), 20.0)["bytes_vs_flat"] == pytest.approx(0.5)
    assert row(derived, nodes.FLAT_REFERENCE, 20.0)["bytes_vs_flat"] == pytest.approx(1.0)


def test_time_to_target_is_against_the_limit_of_the_same_layout_and_comm_share_against_the_uncapped_run():
    derived = nodes.derive(results())
    measured = row(derived, nodes.Case("2x2", "ddp"), 10.0)
    assert measured["time_to_target_s"] == pytest.approx(60 * 0.625)
    assert measured["x_limit"] == pytest.approx(0.625 / 0.5)
    assert measured["comm_share"] == pytest.approx(1 - 0.5 / 0.625)


def test_a_stopped_ddp_run_is_extrapolated_from_the_limits_steps_to_target():
    ddp = row(nodes.derive(results()), nodes.Case("2x2", "auto", cluster.LIMIT), 20.0)
    assert ddp["extrapolated"] and ddp["time_to_target_s"] == pytest.approx(60 * 5.0)
    assert ddp["final_val_loss"] is None


def test_the_table_has_a_row_for_every_case_at_every_rate(tmp_path):
    table = nodes.render_table(nodes.derive(results()), tmp_path / "nodes.json")
    assert table.count("| 20 Mbit/s |") == len(nodes.CASES) and table.count("| 10 Mbit/s |") == len(nodes.CASES)


def test_a_nodes_processes_share_its_namespace_and_are_numbered_node_by_node(tmp_path, monkeypatch):
    settings = nodes.settings_for(nodes.parse_args([]), "2x2")
    lab = NetLab(hosts=settings.workers, rate_mbit=20.0, prefix="t")
    started = []
    monkeypatch.setattr(cluster.subprocess, "Popen", lambda command, env, **_: started.append((command, env)))
    cluster.start_processes(cluster.Run(nodes.DEFAULT_METHOD, 20.0, inner="ddp"), lab, settings, tmp_path / "s.json", None)
    assert [command[3] for command, _ in started] == ["t-h0", "t-h0", "t-h1", "t-h1"]
    assert [(env["RANK"], env["LOCAL_RANK"], env["GROUP_RANK"], env["LOCAL_WORLD_SIZE"]) for _, env in started] == [
        ("0", "0", "0", "2"), ("1", "1", "0", "2"), ("2", "0", "1", "2"), ("3", "1", "1", "2"),
    ]
    assert all(command[command.index("--inner") + 1] == "ddp" for command, _ in started)

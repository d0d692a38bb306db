"""The link-bound benchmark's arithmetic and table, from synthetic run records (no network lab)."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import linkbound  # noqa: E402

RATES = {"0.3": 1.0, "1": 0.3, "3": 0.1}


def history(*points: tuple[int, float]) -> list[dict]:
    return [{"step": step, "val_loss": loss, "wall_s": step * 0.5} for step, loss in points]


def run_record(method: str, role: str, **fields) -> dict:
    base = {"method": method, "role": role, "workers": 4, "small": False, "steps_run": 120, "final_val_loss": 2.3,
            "counted_wire_bytes_per_step": 40_000, "wire_bytes_per_step": 42_000, "step_s": 0.5,
            "history": history((0, 5.0), (60, 2.6), (120, 2.3))}
    return {**base, **fields}


def results() -> dict:
    runs = [run_record("ddp", "limit", counted_wire_bytes_per_step=19_500_000)]
    runs += [run_record(name, "uncapped") for name in linkbound.TRAINED]
    runs += [run_record(name, "uncapped", counted_wire_bytes_per_step=750_000, step_s=0.6) for name in linkbound.COMPUTED[1:]]
    runs += [run_record(name, "capped", ratio=float(ratio), rate_mbit=rate, step_s=1.0,
                        history=[{**p, "wall_s": p["step"] * 1.0} for p in history((0, 5.0), (60, 2.6), (120, 2.3))])
             for ratio, rate in RATES.items() for name in linkbound.TRAINED]
    links = {"settings": {"workers": 4, "steps": 120, "eval_every": 15, "target_step": 60},
             "probe_rate_mbit": 0.5, "probe_ratio": 0.7, "rates_mbit": RATES}
    return {"machine": {"cores": 2, "cpu": "test", "torch": "2.13.0"}, "command": "python benchmarks/linkbound.py", "links": links, "runs": runs}


def test_a_link_independent_method_takes_its_uncapped_steps_at_its_uncapped_step_time_plus_its_wire_bytes_at_the_rate():
    derived = linkbound.derive(results())
    row = next(r for r in derived["link_rows"] if r["method"] == "powersgd-r8" and r["ratio"] == 1.0)
    step = 0.6 + 750_000 * 8 / (0.3 * 1e6)
    assert row["computed"]
    assert row["time_to_target_s"] == pytest.approx(60 * step)
    assert row["comm_share"] == pytest.approx(1 - 0.6 / step)


def test_a_trained_methods_time_to_target_is_measured_and_compared_with_the_limit():
    derived = linkbound.derive(results())
    row = next(r for r in derived["link_rows"] if r["method"] == linkbound.DEFAULT_METHOD and r["ratio"] == 3.0)
    assert not row["computed"]
    assert row["time_to_target_s"] == pytest.approx(60.0)
    assert row["x_limit"] == pytest.approx(60.0 / 30.0)
    assert row["measured_ratio"] == pytest.approx(1.0)


def test_the_table_has_a_row_for_every_method_at_every_rate(tmp_path):
    table = linkbound.render_link_table(linkbound.derive(results()), tmp_path / "linkbound.json")
    for name in (*linkbound.TRAINED, *linkbound.COMPUTED):
        assert table.count(f"| {name} |") == len(RATES)


def with_an_added_method(limit_wall_per_step: float) -> dict:
    """results() plus a later run on the same links: its own limit (slower machine that day) and one method."""
    earlier = results()
    added = [run_record("ddp", "limit", batch=1, history=[{**p, "wall_s": p["step"] * limit_wall_per_step} for p in history((0, 5.0), (60, 2.6), (120, 2.3))])]
    added += [run_record("eager", "uncapped", batch=1, step_s=0.8)]
    added += [run_record("eager", "capped", batch=1, ratio=float(ratio), rate_mbit=rate, step_s=1.0,
                         history=[{**p, "wall_s": p["step"] * 1.0} for p in history((0, 5.0), (60, 2.6), (120, 2.3))])
              for ratio, rate in RATES.items()]
    return {**earlier, "runs": earlier["runs"] + added, "additions": [{"batch": 1, "command": "python benchmarks/linkbound.py --add eager"}]}


def test_a_method_added_later_is_compared_with_the_limit_measured_in_its_own_run():
    derived = linkbound.derive(with_an_added_method(limit_wall_per_step=0.8))
    row = next(r for r in derived["link_rows"] if r["method"] == "eager" and r["ratio"] == 1.0)
    assert row["x_limit"] == pytest.approx(60.0 / 48.0)  # its own limit, not the first run's 30 s
    assert row["comm_share"] == pytest.approx(1 - 0.8 / 1.0)
    default = next(r for r in derived["link_rows"] if r["method"] == linkbound.DEFAULT_METHOD and r["ratio"] == 1.0)
    assert default["x_limit"] == pytest.approx(60.0 / 30.0)


def test_rows_added_later_are_marked_and_their_command_and_limit_are_named(tmp_path):
    table = linkbound.render_link_table(linkbound.derive(with_an_added_method(0.8)), tmp_path / "linkbound.json")
    assert table.count("| eager | 60† |") == len(RATES)
    assert "† Added later on the same links by `python benchmarks/linkbound.py --add eager`" in table
    assert "(target reached in 48 s)" in table

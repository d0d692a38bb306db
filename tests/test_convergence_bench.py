"""The convergence benchmark's bookkeeping: best lr per method, the target, the baseline comparison."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import common  # noqa: E402
import convergence  # noqa: E402


def run(method, lr, final, steps=100, error=False, curve=None):
    history = curve or [{"step": steps, "val_loss": final, "total_bytes": 1000 * steps}]
    record = {"method": method, "lr": lr, "steps": steps, "final_val_loss": final, "history": history,
              "bytes_per_step": 10.0, "dense_bytes_per_step": 1000}
    return {**record, "error": "replicas differed"} if error else record


def test_each_method_is_shown_at_its_lowest_final_loss_among_runs_without_error():
    records = [run("dense", 1e-3, 2.0), run("dense", 2e-3, 1.9), run("x", 1e-3, 1.5, error=True), run("x", 3e-3, 2.5)]
    best = convergence.best_runs(records)
    assert [(r["method"], r["lr"]) for r in best] == [("dense", 2e-3), ("x", 3e-3)]


def test_a_longer_run_of_a_method_is_a_row_of_its_own():
    records = [run("x", 1e-3, 2.0), run("x", 1e-3, 1.8, steps=125)]
    assert len(convergence.best_runs(records)) == 2


def test_a_run_with_adaptive_refresh_is_a_row_of_its_own_and_says_so():
    adaptive = {**run("x", 1e-3, 1.8), "refresh": convergence.refresh_label(0.3)}
    best = convergence.best_runs([run("x", 1e-3, 2.0), adaptive])
    assert len(best) == 2
    assert convergence.label(adaptive, {"settings": {"steps": 100}}) == "x (refresh also when energy < 0.3)"


def test_fresh_runs_replace_earlier_runs_of_the_same_method_steps_and_lr():
    earlier = [run("dense", 1e-3, 2.0), run("x", 1e-3, 3.0)]
    merged = convergence.merge_records(earlier, [run("x", 1e-3, 2.5), run("x", 2e-3, 2.4)])
    assert [(r["method"], r["lr"], r["final_val_loss"]) for r in merged] == [
        ("dense", 1e-3, 2.0), ("x", 1e-3, 2.5), ("x", 2e-3, 2.4)]


def test_the_target_is_two_percent_above_dense_at_its_best_lr():
    results = convergence.derive({"settings": {"steps": 100}, "methods": [run("dense", 1e-3, 2.0), run("dense", 2e-3, 1.9)]})
    assert results["target_val_loss"] == pytest.approx(1.9 * 1.02)


def curve(*points):
    return [{"step": i, "val_loss": loss, "total_bytes": b} for i, (b, loss) in enumerate(points)]


def test_a_curve_below_the_baseline_at_every_shared_byte_count_is_below_it():
    baseline = curve((100, 3.0), (1000, 2.0), (10000, 1.5))
    assert convergence.below_baseline(curve((10, 2.9), (1000, 1.9)), baseline) is True
    assert convergence.below_baseline(curve((1000, 1.9), (10000, 1.6)), baseline) is False
    # past the baseline's last point there is nothing to compare
    assert convergence.below_baseline(curve((10**6, 9.0)), baseline) is None


def test_the_baseline_is_interpolated_in_log_bytes():
    baseline = curve((100, 3.0), (10000, 1.0))
    assert convergence.loss_at_bytes(baseline, 1000) == pytest.approx(2.0)


def test_the_generated_by_line_leaves_out_where_results_were_written():
    command = "python benchmarks/convergence.py --small --out /tmp/x.json --readme=/tmp/r.md --docs /tmp/d.md --methods a --lrs 0.001"
    assert common.measuring_command(command) == "python benchmarks/convergence.py --small --methods a --lrs 0.001"

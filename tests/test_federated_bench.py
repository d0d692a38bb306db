"""The federated benchmark's bookkeeping, from synthetic run records (no training)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import federated  # noqa: E402


def record(label: str, accuracy: float, total_bytes: int, **fields) -> dict:
    run = next(run for run in federated.RUNS if run.label == label)
    return {"label": label, "method": run.method, "lr": run.lr, "flags": list(run.flags), "clients": run.clients,
            "alpha": run.alpha, "steps": run.steps, "accuracy": accuracy, "total_bytes": total_bytes, "bytes_per_round": total_bytes / 20,
            "wall_s": 300.0, "history": [], **fields}


def test_a_runs_round_length_is_its_flag_or_its_methods_own():
    by_label = {run.label: run for run in federated.RUNS}
    assert by_label["subspace-r4-h20"].local_steps == 20
    assert by_label["dense"].local_steps == 10


def test_fresh_runs_replace_earlier_ones_of_the_same_label_in_the_order_of_the_runs():
    earlier = [record("lora-r8", 0.3, 100), record("dense", 0.6, 1000)]
    merged = federated.merge_runs(earlier, [record("lora-r8", 0.5, 100)])
    assert [(r["label"], r["accuracy"]) for r in merged] == [("dense", 0.6), ("lora-r8", 0.5)]


def test_bytes_and_accuracy_are_measured_against_dense_fedavg():
    records = [record("dense", 0.63, 880_000), record("lora-r8", 0.61, 880)]
    federated.add_ratios(records)
    assert records[1]["bytes_ratio"] == 1000
    assert abs(records[1]["accuracy_gap_points"] - 2.0) < 1e-9


def test_each_run_is_measured_against_dense_fedavg_on_its_own_split_and_length():
    records = [
        record("dense", 0.63, 880_000), record("dense-a0.1", 0.52, 880_000), record("dense-600", 0.70, 2_640_000),
        record("votes-k1-h13-a0.1", 0.55, 880), record("votes-k1-h13-600", 0.66, 2_640),
    ]
    federated.add_ratios(records)
    by_label = {r["label"]: r for r in records}
    assert abs(by_label["votes-k1-h13-a0.1"]["accuracy_gap_points"] - (-3.0)) < 1e-9
    assert abs(by_label["votes-k1-h13-600"]["accuracy_gap_points"] - 4.0) < 1e-9
    assert by_label["votes-k1-h13-600"]["bytes_ratio"] == 1000


def test_a_run_without_a_measured_dense_run_of_its_setting_gets_no_ratio():
    records = [record("dense", 0.63, 880_000), record("votes-k1-h13-8-clients", 0.5, 880)]
    federated.add_ratios(records)
    assert "bytes_ratio" not in records[1]


def test_the_table_shows_each_runs_setting_its_gap_and_bytes_per_round():
    records = [record("dense", 0.63, 880_000_000), record("lora-r8", 0.61, 27_280_000)]
    federated.add_ratios(records)
    results = {"machine": {"cpu": "test CPU", "cores": 2, "torch": "2.13.0+cpu"}, "command": "python federated.py",
               "settings": federated.run_settings(), "runs": records}
    table = federated.render_table(results)
    assert "| lora-r8 | `fedavg-h10` lr 0.001 --lora.rank 8 --lora.train-whole classifier | 4, 0.5, 200 | 61.0% | -2.0 | 27.3 MB | 1.36 MB | 32x |" in table

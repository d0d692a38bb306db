"""The GPU benchmark's arithmetic, table and plot, from synthetic step records (no GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # noqa: E402

RUN = gpu.Run("gpt-3m", 4, "gloo", "triton", 15)


def record(rank: int, local_s: float = 0.010, round_end_s: float = 0.030, peak: int = 1000) -> dict:
    """Three rounds of five steps: the first slow (warm-up), then local steps and a slower round end."""
    times = [1.0] * 5 + [local_s, local_s, local_s, local_s, round_end_s] * 2
    summary = {"bytes_per_step": 100.0, "val_loss": 2.5, "replicas_identical": True, "parameter_digest": "ab"}
    return {"step_s": times, "exchanged": [False, False, False, False, True] * 3, "peak_allocated_bytes": peak + rank,
            "peak_reserved_bytes": 2 * peak, "summary": summary, "parameters": 3_200_000}


def test_the_exchange_costs_the_round_end_step_less_a_local_step_and_the_warm_up_round_is_left_out():
    row = gpu.summarise(RUN, [record(rank) for rank in range(4)], per_round=5)
    assert row["local_step_ms"] == pytest.approx(10.0) and row["round_end_step_ms"] == pytest.approx(30.0)
    assert row["round_ms"] == pytest.approx(70.0) and row["exchange_ms"] == pytest.approx(20.0)
    assert row["exchange_share"] == pytest.approx(20.0 / 70.0)


def test_peak_memory_is_the_largest_workers_and_bytes_are_per_round():
    row = gpu.summarise(RUN, [record(rank) for rank in range(4)], per_round=5)
    assert row["peak_allocated_bytes"] == 1003 and row["bytes_per_round"] == pytest.approx(500.0)


def test_the_table_and_plot_name_the_card_and_flag_diverged_replicas(tmp_path):
    rows = [gpu.summarise(RUN, [record(rank) for rank in range(4)], per_round=5)]
    rows.append({**rows[0], "label": "diverged", "digests": ["ab", "cd"]})
    results = {"machine": {"cores": 16, "cpu": "test", "torch": "2.11.0"}, "card": "NVIDIA H200", "triton": "3.6.0",
               "method": "diloco-sparse-k4-h5", "command": "python benchmarks/gpu.py", "rows": rows}
    table = gpu.render_table(results, tmp_path / "gpu.json")
    assert "one NVIDIA H200" in table and "| yes |" in table and "| NO |" in table
    gpu.plot(results, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").stat().st_size > 0

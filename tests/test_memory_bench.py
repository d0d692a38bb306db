"""The memory benchmark's counts: what each method keeps between steps, in a fresh process per row."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory  # noqa: E402


def test_the_lean_methods_keep_at_most_adamws_state_and_the_default_twice_it():
    adamw, default, lean, half_start = (
        memory.measure_in_fresh_process(name, "gpt-3m")
        for name in ("torch AdamW", "diloco-sparse-k4-h5", *memory.LEAN_METHODS)
    )
    assert default["total_bytes"] / adamw["total_bytes"] > 1.99  # AdamW's moments + the round start + the vote momentum
    assert lean["total_bytes"] / adamw["total_bytes"] < 1.01  # a bf16 first moment, a factored second, a bf16 vote momentum
    assert half_start["total_bytes"] / adamw["total_bytes"] < 0.76  # and the matrices' round start in bf16
    assert half_start["round_state_bytes"] < 0.51 * default["round_state_bytes"]


def test_every_recommended_and_lean_method_has_a_row():
    from disttrain.method_listing import RECOMMENDED

    assert set(RECOMMENDED) | set(memory.LEAN_METHODS) <= set(memory.measured_methods())

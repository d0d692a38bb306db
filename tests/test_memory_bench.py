"""The memory benchmark's counts: what each method keeps between steps, in a fresh process per row."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory  # noqa: E402

from disttrain.methods import MEMORY_LEAN_METHOD  # noqa: E402


@pytest.mark.slow
def test_the_memory_lean_choice_keeps_three_quarters_of_adamws_state_and_the_default_twice_it():
    adamw, default, lean = (
        memory.measure_in_fresh_process(name, "gpt-3m") for name in ("torch AdamW", "diloco-sparse-k4-h5", MEMORY_LEAN_METHOD)
    )
    assert default["total_bytes"] / adamw["total_bytes"] > 1.99  # AdamW's moments + the round start + the vote momentum
    # a bf16 first moment, a factored second one, a bf16 vote momentum and the matrices' round start in bf16
    assert lean["total_bytes"] / adamw["total_bytes"] < 0.76
    assert lean["round_state_bytes"] < 0.51 * default["round_state_bytes"]


def test_every_recommended_and_lean_method_has_a_row():
    from disttrain.method_listing import RECOMMENDED

    assert set(RECOMMENDED) | set(memory.LEAN_METHODS) <= set(memory.measured_methods())

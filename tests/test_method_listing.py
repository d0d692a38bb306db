"""`disttrain methods`: sections, the defaults and baselines, the measured figures and the file that ships them."""

import fnmatch
import json
import tomllib
from pathlib import Path

from disttrain.method_listing import MEASURED_FILE, derive_measured, load_measured, render
from disttrain.methods import DEFAULT_FEDERATED_METHOD, DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD, MEMORY_LEAN_METHOD, METHODS
from disttrain.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def sections(text: str) -> dict[str, list[str]]:
    """Each section's title (up to any parenthesis) and its rows, in order; the column header and summary left out."""
    blocks = [block.splitlines() for block in text.split("\n\n")][1:-1]
    return {block[0].split(" (")[0]: block[1:] for block in blocks}


def names(rows: list[str]) -> list[str]:
    return [row.split()[0] for row in rows]


def line_of(name: str, text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.split()[:1] == [name]]
    return line


def test_sections_are_recommended_then_baselines_then_the_other_methods():
    assert list(sections(render())) == ["Recommended", "Baselines", "Other methods of the convergence study"]


def test_the_three_defaults_and_the_memory_lean_choice_are_recommended_with_their_roles():
    recommended = sections(render())["Recommended"]
    assert names(recommended) == [DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD, DEFAULT_FEDERATED_METHOD, MEMORY_LEAN_METHOD]
    roles = ("`disttrain.Session` and the Hugging Face Trainer", "exchanges every step", "--mode federated", "memory-constrained")
    for row, role in zip(recommended, roles):
        assert role in row


def test_dense_ddp_and_powersgd_are_the_baselines():
    expected = ["dense", "ddp", *(name for name in METHODS if name.startswith("powersgd-r"))]
    assert names(sections(render())["Baselines"]) == expected


def test_all_lists_every_registered_method_exactly_once():
    listed = [name for rows in sections(render(show_all=True)).values() for name in names(rows)]
    assert sorted(listed) == sorted(METHODS)


def test_by_default_the_other_methods_are_a_short_list_of_measured_ones_with_a_hint():
    text, title = render(), "Other methods of the convergence study"
    others = sections(text)[title]
    assert 0 < len(others) < len(sections(render(show_all=True))[title])
    assert set(names(others)) <= set(load_measured())
    assert f"`disttrain methods --all` shows all {len(METHODS)}" in text


def test_a_measured_method_shows_its_final_val_loss_and_bytes_ratio_from_the_study():
    results = json.loads((RESULTS / "convergence.json").read_text())
    runs = [r for r in results["methods"] if r["method"] == DEFAULT_METHOD and "error" not in r]
    best = min(runs, key=lambda r: r["final_val_loss"])
    line = line_of(DEFAULT_METHOD, render())
    assert f"val loss {best['final_val_loss']:.3f} @{results['settings']['steps']} steps" in line
    assert f"{best['dense_bytes_per_step'] / best['bytes_per_step']:.0f}x fewer" in line


def test_a_method_measured_only_in_the_short_study_shows_its_300_step_loss():
    assert "@300 steps" in line_of("power-r8", render(show_all=True))


def test_a_best_run_at_another_peak_lr_than_the_methods_own_names_that_lr():
    run = load_measured()["flora-int8-r8"]
    assert run["lr"] != METHODS["flora-int8-r8"].lr
    assert f"(at lr {run['lr']:g})" in line_of("flora-int8-r8", render(show_all=True))


def test_an_unmeasured_method_says_so():
    unmeasured = next(name for name in METHODS if name not in load_measured())
    assert "not measured" in line_of(unmeasured, render(show_all=True))


def test_the_shipped_measured_file_matches_the_benchmark_results():
    assert load_measured() == derive_measured(RESULTS), "rerun `python benchmarks/convergence.py --render-only`"


def test_the_measured_file_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert MEASURED_FILE.parent == REPO / "disttrain" / "data"
    assert any(fnmatch.fnmatch(MEASURED_FILE.name, pattern) for pattern in package_data["disttrain.data"])


def test_round_and_vote_overrides_reach_the_method_the_run_trains_with():
    method = TrainConfig(method="diloco-sparse-k4-h10", votes_per_chunk=16, local_steps=20, outer_lr=0.01).resolved_method()
    assert (method.compression.per_chunk, method.local_steps, method.outer_lr) == (16, 20, 0.01)


def test_rank_reaches_the_subspace_of_a_method_whose_local_steps_keep_to_one():
    method = TrainConfig(method="fedavg-subspace-votes-k1-h13", rank=8).resolved_method()
    assert (method.local_subspace.rank, method.compression.basis) == (8, "sparse_momentum")

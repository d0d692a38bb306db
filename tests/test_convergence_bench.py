"""The convergence benchmark's bookkeeping: best lr per method, the target, the baseline comparison."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

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


def test_a_run_on_contiguous_shards_is_a_row_of_its_own_measured_against_dense_on_the_same_data():
    contiguous = {"sharding": "contiguous", "seed": 0}
    records = [run("dense", 1e-3, 2.0), run("x", 1e-3, 2.1),
               {**run("dense", 1e-3, 2.5), "data": contiguous}, {**run("x", 1e-3, 2.55), "data": contiguous}]
    results = convergence.derive({"settings": {"steps": 100}, "methods": records})
    assert len(convergence.best_runs(results["methods"])) == 4
    assert results["target_val_loss"] == pytest.approx(2.0 * 1.02)  # the headline's target stays IID dense's
    assert records[1]["gap_to_dense"] == pytest.approx(0.05)
    assert records[3]["gap_to_dense"] == pytest.approx(0.02)
    assert records[3]["steps_to_target"] == 100  # 2.55 <= 2.5 * 1.02: reached on its own data's target
    assert convergence.label(records[3], results) == "x (contiguous shards, seed 0)"


def test_runs_at_the_headline_data_keep_no_data_field_and_others_are_flagged():
    settings = {"seed": 0}
    assert convergence.run_data(convergence.parse_args([]), settings) is None
    assert convergence.run_data(convergence.parse_args(["--seed", "1"]), settings) == {"sharding": "iid", "seed": 1}
    assert convergence.run_data(convergence.parse_args(["--sharding", "contiguous"]), settings) == {"sharding": "contiguous", "seed": 0}


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
    command = "python benchmarks/convergence.py --small --out /tmp/x.json --doc=/tmp/b.md --study-doc /tmp/d.md --methods a --lrs 0.001"
    assert common.measuring_command(command) == "python benchmarks/convergence.py --small --methods a --lrs 0.001"
    older = "python benchmarks/convergence.py --readme /tmp/r.md --docs=/tmp/d.md --methods a"  # as earlier runs recorded it
    assert common.measuring_command(older) == "python benchmarks/convergence.py --methods a"


def small_results(runs: int) -> dict:
    settings = {"workers": 4, "backend": "gloo", "steps": convergence.SMALL_STEPS, "eval_every": convergence.SMALL_EVAL_EVERY,
                "seed": 0, "batch_size_per_worker": 8, "block_size": 128, "warmup_steps": 20, "min_lr_ratio": 0.1}
    records = [run("dense", 1e-3, 2.0, steps=settings["steps"])] + [
        run(f"method-{i}", 1e-3, 2.5, steps=settings["steps"]) for i in range(runs - 1)
    ]
    for i, record in enumerate(records):
        record.update(wall_s=1.0, command=f"python benchmarks/convergence.py --small --methods {record['method']} --lrs {i}e-3")
    return convergence.derive({"settings": settings, "machine": {"cores": 2, "cpu": "test", "torch": "x"},
                               "method_note": "a note", "methods": records})


def test_the_table_says_in_one_line_how_it_was_made_however_many_runs_it_merges():
    table = convergence.render_table(small_results(40))
    last = table.splitlines()[-1]
    generated = last[last.index("Generated by"):]
    assert generated == (
        "Generated by `python benchmarks/convergence.py --small` "
        "(40 runs; every run's command is in benchmarks/results/convergence-small.json)."
    )
    assert "--methods" not in table


def test_the_tables_go_into_docs_benchmarks_md_and_the_study_and_nothing_into_the_readme(tmp_path):
    args = convergence.parse_args([])
    assert (args.doc, args.study_doc) == (common.REPO_ROOT / "docs" / "benchmarks.md", common.REPO_ROOT / "docs" / "convergence.md")
    assert convergence.parse_args(["--docs", "/tmp/d.md"]).study_doc == Path("/tmp/d.md")  # the flag's earlier name
    doc = tmp_path / "benchmarks.md"
    doc.write_text("before\n<!-- convergence-small-table:start -->\nold\n<!-- convergence-small-table:end -->\nafter\n")
    assert common.publish_table("| new |", "convergence-small-table", doc, tmp_path)
    assert doc.read_text() == "before\n<!-- convergence-small-table:start -->\n| new |\n<!-- convergence-small-table:end -->\nafter\n"
    assert not common.publish_table("| new |", "cluster-table", doc, tmp_path)  # no markers: says so, changes nothing


MARKERS = ("convergence-table", "convergence-small-table", "cluster-table", "memory-table", "kernels-table",
           "federated-table", "chaos-table")


def test_docs_benchmarks_md_holds_every_generated_table_and_the_readme_none():
    doc = (common.REPO_ROOT / "docs" / "benchmarks.md").read_text()
    readme = (common.REPO_ROOT / "README.md").read_text()
    for marker in MARKERS:
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        assert doc.count(start) == doc.count(end) == 1 and doc.index(start) < doc.index(end), marker
        assert start not in readme and end not in readme, marker


def test_the_second_scale_runs_a_19m_parameter_gpt_and_keeps_its_own_results_file():
    from disttrain.launcher.worker import build_parser, check_worker_args
    from disttrain.models.gpt import GPT

    args = convergence.parse_args(["--model", "gpt-19m", "--small"])
    assert args.out.name == "convergence-gpt-19m.json"
    settings = convergence.run_settings(args)
    flags = convergence.worker_flags("dense", 1e-3, 10, settings, Path("/tmp/s.json"), None)
    config = check_worker_args(build_parser().parse_args(flags))
    assert 18e6 < GPT(config.model).num_parameters() < 20e6
    assert convergence.base_command(settings) == "python benchmarks/convergence.py --model gpt-19m --small"
    assert "model" not in convergence.run_settings(convergence.parse_args([]))  # earlier results files still merge

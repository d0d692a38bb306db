"""Link-bound benchmark: the default, its overlapped and flat-bytes variants and the baselines on links
slow enough that the default's exchange takes about 0.3x, 1x and 3x its round's compute.

The cluster benchmark's lab (one worker per network namespace, every link capped with tc tbf both
ways). Calibration: the default's uncapped step time and counted wire bytes give the rate at which
its exchange would take as long as its round's compute; a probe run on that link measures the ratio
it really reaches (tbf's burst and TCP make it differ), and the three rates are scaled from it.
On each rate the default, the default with overlap and the flat-bytes exchange train for real.
DDP's and PowerSGD's loss curves do not depend on the link (the same sums in the same order), and
a few capped steps would time only powerSGD_hook's dense warm-up steps, so their capped step time
is computed: the uncapped step time plus the counted ring wire bytes of a step at the rate.
A second table trains the small model at 4, 8 and 16 workers on one link: wire bytes per worker
and time to target as workers are added. Needs root and iproute2, like the cluster benchmark.

    python benchmarks/linkbound.py --steps 120     # both tables, as in docs/benchmarks.md (about 65 minutes on 2 cores)
    python benchmarks/linkbound.py --add diloco-sparse-k4-h5-overlap-eager   # more rows on the saved links
    python benchmarks/linkbound.py --render-only   # the tables and plots from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from disttrain.methods import DEFAULT_METHOD, get_method  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # siblings also when run via `disttrain bench`
import common  # noqa: E402
from cluster import LIMIT, Run, Runner, Settings, interpolate_crossing  # noqa: E402
from netlab import ready_for  # noqa: E402

log = logging.getLogger("benchmarks.linkbound")

OVERLAP_METHOD = "diloco-sparse-k4-h5-overlap"
FLAT_METHOD = "diloco-owners-k4-keep16-h5"
TRAINED = (DEFAULT_METHOD, OVERLAP_METHOD, FLAT_METHOD)  # trained for real on every capped link
COMPUTED = (LIMIT, "powersgd-r4", "powersgd-r8")  # capped step time computed from the uncapped run
RATIOS = (0.3, 1.0, 3.0)  # the default's exchange time over its round's compute
WORKER_COUNTS = (4, 8, 16)
WORKER_METHODS = (DEFAULT_METHOD, FLAT_METHOD, "diloco-owners-k4-keep8-h5")
PROBE_STEPS = 30
MARKER, WORKERS_MARKER = "linkbound-table", "linkbound-workers-table"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps of every full run (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between evaluations (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=2400.0, help="give up on one run after this long")
    parser.add_argument("--no-workers-table", action="store_true", help="skip the 4/8/16-worker table")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "linkbound.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the tables go into, between their markers")
    parser.add_argument("--render-only", action="store_true", help="only redraw plots and tables from --out")
    parser.add_argument(
        "--add", default="", metavar="METHODS",
        help="comma-separated methods to train on the links saved in --out, next to its rows: this run measures its own "
             "limit and their uncapped step times, and their rows compare with those",
    )
    return parser.parse_args(argv)


def base_settings(args: argparse.Namespace, workers: int = 4, small: bool = False) -> Settings:
    return Settings(
        workers=workers, steps=args.steps, eval_every=args.eval_every, target_step=args.steps // 2 // args.eval_every * args.eval_every,
        headline_mbit=0.0, calibration_steps=PROBE_STEPS, max_run_s=0.0, small=small,
    )


def nominal_rate(uncapped: dict[str, Any]) -> float:
    """Mbit/s at which the counted wire bytes of a step take as long as the step's compute."""
    return uncapped["counted_wire_bytes_per_step"] * 8 / uncapped["step_s"] / 1e6


def link_table_runs(args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """The limit, the calibration, and every method on the three calibrated links."""
    settings = base_settings(args)
    run(Run(LIMIT, None), settings, role="limit")
    uncapped = {name: run(Run(name, None, stop_at=PROBE_STEPS), settings, role="uncapped") for name in TRAINED}
    for name in COMPUTED[1:]:
        run(Run(name, None), settings, role="uncapped")
    probe_rate = nominal_rate(uncapped[DEFAULT_METHOD])
    probe = run(Run(DEFAULT_METHOD, probe_rate, stop_at=PROBE_STEPS), settings, role="probe")
    probe_ratio = probe["step_s"] / uncapped[DEFAULT_METHOD]["step_s"] - 1
    rates = {ratio: probe_rate * probe_ratio / ratio for ratio in RATIOS}
    log.info("calibration: at %.3f Mbit/s the default's exchange took %.2fx its compute; rates %s", probe_rate, probe_ratio,
             ", ".join(f"{ratio:g}x: {rate:.3f} Mbit/s" for ratio, rate in rates.items()))
    for ratio, rate in rates.items():
        for name in TRAINED:
            run(Run(name, rate), settings, role="capped", ratio=ratio)
    return {
        "settings": dataclasses.asdict(settings), "probe_rate_mbit": probe_rate, "probe_ratio": probe_ratio,
        "rates_mbit": {f"{ratio:g}": rate for ratio, rate in rates.items()},
    }


def workers_table_runs(args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """The small model at 4, 8 and 16 workers on one link (the rate of ratio 1 for the small default at 4)."""
    small = base_settings(args, small=True)
    limit = run(Run(LIMIT, None), small, role="workers-limit")
    reference = run(Run(DEFAULT_METHOD, None, stop_at=PROBE_STEPS), small, role="workers-uncapped")
    rate = nominal_rate(reference)
    for workers in WORKER_COUNTS:
        for name in WORKER_METHODS:
            run(Run(name, rate), dataclasses.replace(small, workers=workers), role="workers")
    target = next(p["val_loss"] for p in limit["history"] if p["step"] == small.target_step)
    return {"settings": dataclasses.asdict(small), "rate_mbit": rate, "target_val_loss": target}


def added_runs(args: argparse.Namespace, earlier: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """``methods`` on the earlier run's capped links, with a limit and uncapped runs of their own
    (batch n: the n-th addition); they replace the earlier rows of those methods."""
    settings = Settings(**earlier["links"]["settings"])
    batch = 1 + max((r.get("batch", 0) for r in earlier["runs"]), default=0)
    rates = {float(ratio): rate for ratio, rate in earlier["links"]["rates_mbit"].items()}
    logs_dir = args.out.parent / "logs" / "linkbound"
    with logging_redirect_tqdm():
        run = Runner(logs_dir, args.timeout_s, 1 + len(methods) * (1 + len(rates)))
        run(Run(LIMIT, None), settings, role="limit", batch=batch)
        for name in methods:
            run(Run(name, None, stop_at=PROBE_STEPS), settings, role="uncapped", batch=batch)
            for ratio, rate in rates.items():
                run(Run(name, rate), settings, role="capped", ratio=ratio, batch=batch)
        run.bar.close()
    kept = [r for r in earlier["runs"] if r["small"] or r["method"] not in methods or r["role"] == "limit"]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    return {**earlier, "runs": kept + run.records, "additions": [*earlier.get("additions", []), {"batch": batch, "command": command}]}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    logs_dir = args.out.parent / "logs" / "linkbound"
    logs_dir.mkdir(parents=True, exist_ok=True)
    total = len(COMPUTED) + len(TRAINED) + 1 + len(RATIOS) * len(TRAINED)
    if not args.no_workers_table:
        total += 2 + len(WORKER_COUNTS) * len(WORKER_METHODS)
    with logging_redirect_tqdm():
        run = Runner(logs_dir, args.timeout_s, total)
        results: dict[str, Any] = {"machine": common.machine_description(), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
        results["links"] = link_table_runs(args, run)
        if not args.no_workers_table:
            results["workers"] = workers_table_runs(args, run)
        run.bar.close()
    results["runs"] = run.records
    return results


def steps_to(history: list[dict[str, Any]], target: float) -> float | None:
    return interpolate_crossing(history, target, "step")


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Target, time to target, x the limit and comm share of every capped run; DDP's rows computed."""
    runs = [r for r in results["runs"] if not r["small"]]
    links = results["links"]
    limits = {r.get("batch", 0): r for r in runs if r["role"] == "limit"}
    target = next(p["val_loss"] for p in limits[0]["history"] if p["step"] == links["settings"]["target_step"])
    limit_times = {batch: interpolate_crossing(r["history"], target, "wall_s") for batch, r in limits.items()}
    limit_time = limit_times[0]
    uncapped = {(r.get("batch", 0), r["method"]): r for r in runs if r["role"] in ("uncapped", "limit")}
    rows = []
    for record in (r for r in runs if r["role"] == "capped"):
        batch = record.get("batch", 0)
        time = interpolate_crossing(record["history"], target, "wall_s")
        rows.append({
            "method": record["method"], "ratio": record["ratio"], "rate_mbit": record["rate_mbit"], "workers": record["workers"],
            "batch": batch, "computed": False, "time_to_target_s": time,
            "x_limit": None if time is None else time / limit_times[batch],
            "final_val_loss": record["final_val_loss"], "steps_run": record["steps_run"],
            "counted_wire_bytes_per_step": record["counted_wire_bytes_per_step"], "tx_bytes_per_step": record["wire_bytes_per_step"],
            "comm_share": max(0.0, 1 - uncapped[batch, record["method"]]["step_s"] / record["step_s"]),
            "step_s": record["step_s"],
        })
    for ratio, rate in links["rates_mbit"].items():
        rows += [computed_row(uncapped[0, name], target, limit_time, float(ratio), rate) for name in COMPUTED]
    for row in rows:
        if row["method"] == DEFAULT_METHOD:
            row["measured_ratio"] = row["step_s"] / uncapped[row["batch"], DEFAULT_METHOD]["step_s"] - 1
    results.update(target_val_loss=target, limit_time_to_target_s=limit_time, limit_times_s=limit_times, link_rows=rows)
    if "workers" in results:
        results["worker_rows"] = worker_rows(results)
    return results


def computed_row(uncapped: dict[str, Any], target: float, limit_time: float, ratio: float, rate: float) -> dict[str, Any]:
    """A link-independent method on a capped link: its uncapped steps to target x (its uncapped step
    time + its counted ring wire bytes per step at the rate)."""
    step = uncapped["step_s"] + uncapped["counted_wire_bytes_per_step"] * 8 / (rate * 1e6)
    steps = steps_to(uncapped["history"], target)
    time = None if steps is None else steps * step
    return {
        "method": uncapped["method"], "ratio": ratio, "rate_mbit": rate, "workers": uncapped["workers"], "batch": 0, "computed": True,
        "time_to_target_s": time, "x_limit": None if time is None else time / limit_time,
        "final_val_loss": uncapped["final_val_loss"], "steps_run": 0, "counted_wire_bytes_per_step": uncapped["counted_wire_bytes_per_step"],
        "tx_bytes_per_step": None, "comm_share": 1 - uncapped["step_s"] / step, "step_s": step,
    }


def worker_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    target = results["workers"]["target_val_loss"]
    return [
        {
            "method": r["method"], "workers": r["workers"], "rate_mbit": r["rate_mbit"],
            "counted_wire_bytes_per_step": r["counted_wire_bytes_per_step"], "tx_bytes_per_step": r["wire_bytes_per_step"],
            "time_to_target_s": interpolate_crossing(r["history"], target, "wall_s"), "final_val_loss": r["final_val_loss"],
            "step_s": r["step_s"],
        }
        for r in results["runs"] if r["role"] == "workers"
    ]


def _number(value: float | None, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def render_link_table(results: dict[str, Any], out: Path) -> str:
    links = results["links"]
    headers = ["exchange / compute", "link", "method", "time to target (s)", "x the limit", f"val loss @ {links['settings']['steps']}",
               "wire/step (counted)", "wire/step (tx_bytes)", "comm % of step"]
    rows = []
    for row in sorted(results["link_rows"], key=lambda r: (r["ratio"], r["method"] != LIMIT, r["method"])):
        ratio = f"{row['ratio']:g}x" + (f" (measured {row['measured_ratio']:.2f}x)" if "measured_ratio" in row else "")
        time = _number(row["time_to_target_s"], ".0f", "not reached") + ("*" if row["computed"] else "") + "†" * row["batch"]
        rows.append([
            ratio, f"{row['rate_mbit']:.3g} Mbit/s", row["method"], time, _number(row["x_limit"], ".2f"),
            _number(row["final_val_loss"], ".3f"), common.human_bytes(row["counted_wire_bytes_per_step"]),
            common.human_bytes(row["tx_bytes_per_step"]), _number(100 * row["comm_share"], ".0f"),
        ])
    s = links["settings"]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"Target: val loss {results['target_val_loss']:.4f}, the uncapped DDP run's at step {s['target_step']} "
        f"(reached in {results['limit_time_to_target_s']:.0f} s: the compute-bound limit). Calibration: at "
        f"{links['probe_rate_mbit']:.3f} Mbit/s (where the default's counted wire bytes would take as long as its compute) "
        f"its exchange took {links['probe_ratio']:.2f}x its compute over {PROBE_STEPS} steps; the three rates are scaled from that. "
        f"Measured on {common.machine_line(results['machine'])}: {s['workers']} workers, one per network namespace, links capped with "
        f"tc tbf both ways; {s['steps']} steps, eval every {s['eval_every']}. Comm % = 1 - the method's uncapped step time / its "
        "capped step time. \\* Computed, not run on the capped link: DDP's and PowerSGD's curves do not depend on the link, so "
        "their time is their uncapped steps to target x (their uncapped step time + their counted ring wire bytes per step at "
        "the rate; PowerSGD's include powerSGD_hook's two dense warm-up steps); their loss is the uncapped run's. "
        f"{added_note(results)}{common.generated_by(results['command'], out)}"
    )


def added_note(results: dict[str, Any]) -> str:
    """Which rows were added later on the same links, and the limit each is compared with."""
    return "".join(
        f"{'†' * a['batch']} Added later on the same links by `{a['command']}`, against that run's own uncapped DDP limit "
        f"(target reached in {results['limit_times_s'][a['batch']]:.0f} s). "
        for a in results.get("additions", [])
    )


def render_workers_table(results: dict[str, Any], out: Path) -> str:
    workers = results["workers"]
    headers = ["method", "workers", "wire/step per worker (counted)", "wire/step (tx_bytes)", "time to target (s)", "s/step",
               f"val loss @ {workers['settings']['steps']}"]
    rows = [
        [r["method"], str(r["workers"]), common.human_bytes(r["counted_wire_bytes_per_step"]), common.human_bytes(r["tx_bytes_per_step"]),
         _number(r["time_to_target_s"], ".0f", "not reached"), f"{r['step_s']:.2f}", f"{r['final_val_loss']:.3f}"]
        for r in sorted(results["worker_rows"], key=lambda r: (r["method"], r["workers"]))
    ]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"The small model (--small settings: 2 layers x 128), links at {workers['rate_mbit']:.3g} Mbit/s (where the default's "
        f"counted wire bytes at 4 workers take as long as its compute); target val loss {workers['target_val_loss']:.4f}, the "
        f"uncapped 4-worker DDP run's at step {workers['settings']['target_step']}. Every worker is a process on the same 2 cores, "
        "so step time grows with the workers for compute alone; the bytes are what to compare. "
        f"{common.generated_by(results['command'], out)}"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Time to target against the exchange/compute ratio, one line per method."""
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = sorted({r["method"] for r in results["link_rows"]})
    for method in methods:
        rows = sorted((r for r in results["link_rows"] if r["method"] == method and r["x_limit"] is not None), key=lambda r: r["ratio"])
        ax.plot([r["ratio"] for r in rows], [r["x_limit"] for r in rows], "--" if rows and rows[0]["computed"] else "-",
                marker="o", label=method)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="compute-bound limit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("the default's exchange time / its round's compute (log scale)")
    ax.set_ylabel("time to target / the limit's (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="dashed: computed from the uncapped run", title_fontsize=7)
    fig.text(0.5, 0.01, f"4 workers in network namespaces, tc tbf; {common.machine_line(results['machine'])}", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict[str, Any], document: Path, out: Path) -> bool:
    plot(results, out.parent / "linkbound_time_vs_ratio.png")
    ok = common.publish_table(render_link_table(results, out), MARKER, document, out.parent)
    if "worker_rows" in results:
        ok &= common.publish_table(render_workers_table(results, out), WORKERS_MARKER, document, out.parent)
    return ok


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    for name in (*TRAINED, *COMPUTED[1:]):
        get_method(name)
    if not args.render_only and not ready_for("link-bound benchmark"):
        return 0
    added = [name.strip() for name in args.add.split(",") if name.strip()]
    for name in added:
        get_method(name)
    if added:
        earlier = common.read_results(args.out)
        if earlier is None or not common.same_machine(earlier["machine"], common.machine_description()):
            log.error("--add trains on the links saved in %s, measured on this machine: run the whole benchmark first", args.out)
            return 2
        results = added_runs(args, earlier, added)
        common.save_results(args.out, results)
    else:
        results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args))
    if results is None:
        return 2
    return 0 if render(derive(results), args.doc, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Convergence benchmark: every method trains the small GPT with 4 local workers on the same
seed, data and steps; records val loss against steps, payload and wire bytes and wall-clock,
plots it, and regenerates its table in docs/benchmarks.md and docs/convergence.md from the
JSON. A method may be run at several peak learning rates (a sweep); the table and plots show
each method at its best one, and the JSON keeps every run. Re-running some (method, lr) pairs
replaces their rows in the results file (if it was measured with the same settings on this
machine) and keeps the rest.

    python benchmarks/convergence.py                   # the headline run: 1000 steps
    python benchmarks/convergence.py --small           # 300 steps, its own results file and table
    python benchmarks/convergence.py --methods dense,diloco-int1-h40 --lrs 1e-3,2e-3
    python benchmarks/convergence.py --methods diloco-sparse-k4-h5 --steps-factor 1.25   # its own row
    python benchmarks/convergence.py --small --methods dense,diloco-sparse-k4-h5 --sharding contiguous   # non-IID rows
    python benchmarks/convergence.py --small --methods dense,diloco-sparse-k4-h5 --seed 1                # another seed
    python benchmarks/convergence.py --small --model gpt-19m --methods dense,diloco-sparse-k4-h5   # the second scale
    python benchmarks/convergence.py --render-only     # plots + table from the existing JSON
    python benchmarks/convergence.py --small --render-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, get_args

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from disttrain import method_listing  # noqa: E402
from disttrain.launcher.elastic_job import ElasticJob, WorkersStillRunning  # noqa: E402
from disttrain.launcher.local import launch_local  # noqa: E402
from disttrain.data.corpus import Sharding  # noqa: E402
from disttrain.methods import get_method  # noqa: E402
from disttrain.models.gpt import GPT  # noqa: E402
from disttrain.train.config import TrainConfig  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.convergence")

WORKERS = 4
DEFAULT_METHODS = (
    "dense",
    "powersgd-r4",
    "svd-projected",
    "svd-reconstruct",
    "seeded-projected",
    "seeded-reconstruct",
    "seeded-int8-projected",
    "seeded-int8-reconstruct",
    "svd-int8-reconstruct",
)
FULL_STEPS, FULL_EVAL_EVERY = 1000, 50
SMALL_STEPS, SMALL_EVAL_EVERY = 300, 25
TARGET_SLACK = 1.02  # "reaches dense's loss": within 2% of the dense run's final val loss
BASELINE = "powersgd-r4"  # the curve every method should beat at equal cumulative bytes
LOGS_DIR = common.RESULTS_DIR / "logs"
MARKERS = "os^"  # past the colour map's 20 colours, the next methods get the next marker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    parser.add_argument("--steps", type=int, help=f"training steps (default {FULL_STEPS}, {SMALL_STEPS} with --small)")
    parser.add_argument("--eval-every", type=int, help=f"steps between evals (default {FULL_EVAL_EVERY}, {SMALL_EVAL_EVERY} with --small)")
    parser.add_argument("--small", action="store_true", help=f"{SMALL_STEPS} steps, results in convergence-small.json")
    parser.add_argument("--lrs", help="comma-separated peak learning rates to run each method at (default: each method's own)")
    parser.add_argument(
        "--steps-factor", type=float, default=1.0,
        help="run the selected methods for this many times --steps (their schedule spans it); such runs get their own rows",
    )
    parser.add_argument(
        "--adaptive-refresh", type=float, metavar="ENERGY",
        help="run the selected methods under a local coordinator that also refreshes their data-dependent bases "
        "whenever rank 0's captured energy |P^T G|^2/|G|^2 drops below ENERGY; such runs get their own rows",
    )
    parser.add_argument(
        "--sharding", choices=get_args(Sharding), default="iid",
        help="how the workers' data are split: contiguous gives each its own slice of the text (non-IID); such runs get their own rows",
    )
    parser.add_argument("--seed", type=int, default=TrainConfig().seed, help="the runs' seed; runs at another seed than the default get their own rows")
    parser.add_argument(
        "--model", choices=common.MODEL_SIZES, default=common.DEFAULT_MODEL,
        help="the GPT to train (gpt-19m: the scale study's 6 x 512); another model's results go to convergence-<model>.json",
    )
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up on one method's run after this long")
    parser.add_argument("--out", type=Path, help="results file (default: results/convergence.json, convergence-small.json with --small)")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument(
        "--study-doc", "--docs", dest="study_doc", type=Path, default=common.REPO_ROOT / "docs" / "convergence.md",
        help="the study's write-up, which gets the table too",
    )
    parser.add_argument("--render-only", action="store_true", help="only redraw plots and the table from --out")
    args = parser.parse_args(argv)
    args.steps = args.steps or (SMALL_STEPS if args.small else FULL_STEPS)
    args.eval_every = args.eval_every or (SMALL_EVAL_EVERY if args.small else FULL_EVAL_EVERY)
    args.out = args.out or default_results_file({"steps": args.steps, "eval_every": args.eval_every, "model": args.model})
    args.lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else None
    if args.lrs and any(lr <= 0 for lr in args.lrs):
        parser.error(f"--lrs must be positive learning rates, got {args.lrs}")
    if args.adaptive_refresh is not None and not 0 < args.adaptive_refresh < 1:
        parser.error(f"--adaptive-refresh is a share of the gradient's energy in (0, 1), got {args.adaptive_refresh}")
    return args


def selected_methods(spec: str) -> list[str]:
    """Validated method names, dense first (its final loss is everyone's target)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        get_method(name)
    return sorted(dict.fromkeys(names), key=lambda name: name != "dense")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run shares, from the flags and TrainConfig's defaults (the peak lr is per run)."""
    defaults = TrainConfig()
    model = {} if args.model == common.DEFAULT_MODEL else {"model": args.model}  # earlier results files name none
    return {
        **model,
        "workers": WORKERS,
        "backend": "gloo",
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seed": defaults.seed,
        "batch_size_per_worker": defaults.data.batch_size,
        "block_size": defaults.data.block_size,
        "warmup_steps": defaults.optim.warmup_steps,
        "min_lr_ratio": defaults.optim.min_lr_ratio,
    }


def method_note(settings: dict[str, Any]) -> str:
    """How the numbers were measured, in one sentence."""
    model = settings.get("model", common.DEFAULT_MODEL)
    parameters = GPT(common.MODEL_SIZES[model]).num_parameters() if "model" in settings else None
    return (
        ("" if parameters is None else f"the {model} GPT ({parameters / 1e6:.1f} M parameters), ")
        + f"{settings['workers']} local worker processes ({settings['backend']}), {settings['steps']} steps, "
        f"batch {settings['batch_size_per_worker']} x {settings['block_size']} tokens per worker, seed {settings['seed']}, "
        f"{settings['warmup_steps']} warm-up steps then cosine decay to {settings['min_lr_ratio']:g} x the peak lr "
        f"(each method at its best swept peak lr); val loss every {settings['eval_every']} steps; "
        "bytes/step = payload bytes each worker put into collectives (scales and basis broadcasts included), "
        "wire = what the collectives moved per worker (ring all_reduce 2(W-1)/W x payload, all_gather (W-1) x payload)"
    )


def run_data(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The runs' data split and seed where they are not the headline's (IID at the settings' seed), else None."""
    if (args.sharding, args.seed) == ("iid", settings["seed"]):
        return None
    return {"sharding": args.sharding, "seed": args.seed}


def data_label(data: dict[str, Any] | None) -> str | None:
    """How a run's data differ from the headline's, in words."""
    if data is None:
        return None
    words = ["contiguous shards" if data["sharding"] == "contiguous" else "IID"]
    return ", ".join(words + [f"seed {data['seed']}"])


def worker_flags(method: str, lr: float, steps: int, settings: dict[str, Any], summary_file: Path, data: dict[str, Any] | None) -> list[str]:
    """Flags for ``python -m disttrain.launcher``."""
    data = data or {"sharding": "iid", "seed": settings["seed"]}
    return [
        "--method", method,
        "--steps", str(steps),
        "--eval_every", str(settings["eval_every"]),
        "--seed", str(data["seed"]),
        "--data.sharding", data["sharding"],
        "--optim.lr", repr(lr),
        "--summary-file", str(summary_file),
        *common.model_flags(settings.get("model", common.DEFAULT_MODEL)),
    ]


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr file descriptors (so the workers' too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def launch_with_coordinator(flags: list[str], energy: float, workdir: Path, timeout_s: float) -> int:
    """Run WORKERS workers that take their ranks from a local coordinator with adaptive refresh;
    the first failing exit code, or 0. Each process logs to its own file in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = ElasticJob(workdir, flags, link_mbit=0)
    try:
        job.start_coordinator(WORKERS, ["--refresh", "adaptive", "--energy-threshold", repr(energy)])
        for _ in range(WORKERS):
            job.start_worker()
        return next((code for code in job.wait_for_exit(list(range(WORKERS)), timeout_s) if code), 0)
    finally:
        job.close()


def refresh_label(energy: float | None) -> str | None:
    """How a run's bases were refreshed, when not on the method's own schedule alone."""
    return None if energy is None else f"also when energy < {energy:g}"


def run_method(
    name: str, lr: float, steps: int, settings: dict[str, Any], timeout_s: float, adaptive_energy: float | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with one method at one peak lr for ``steps`` steps; its record, with an ``error`` field if the run failed."""
    refresh = refresh_label(adaptive_energy)
    stem = f"{name}-{steps}steps-lr{lr:g}" + ("" if adaptive_energy is None else f"-adaptive{adaptive_energy:g}")
    stem += "" if data is None else f"-{data['sharding']}-seed{data['seed']}"
    summary_file, log_file = LOGS_DIR / f"{stem}.summary.json", LOGS_DIR / f"{stem}.log"
    summary_file.unlink(missing_ok=True)
    record: dict[str, Any] = {
        "method": name, "lr": lr, "steps": steps, "summary": get_method(name).summary,
        "log": str(log_file.relative_to(common.REPO_ROOT)),
        **({"refresh": refresh} if refresh else {}),
        **({"data": data} if data else {}),
    }
    flags = worker_flags(name, lr, steps, settings, summary_file, data)
    try:
        if adaptive_energy is None:
            with output_to(log_file):
                code = launch_local(WORKERS, flags, timeout_s=timeout_s)
        else:
            log_file = LOGS_DIR / stem  # a folder: the coordinator's and each worker's log
            record["log"] = str(log_file.relative_to(common.REPO_ROOT))
            code = launch_with_coordinator(flags, adaptive_energy, log_file, timeout_s)
    except (subprocess.TimeoutExpired, WorkersStillRunning):
        return {**record, "error": f"timed out after {timeout_s:.0f} s; see {log_file}"}
    if summary_file.is_file():
        record.update(summary_fields(json.loads(summary_file.read_text())))
    if code != 0 or not summary_file.is_file():
        reason = "replicas differed" if code == 1 and summary_file.is_file() else "workers failed"
        record["error"] = f"{reason} (exit code {code}); see {log_file}"
    return record


def summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The per-method fields taken from a worker's summary file."""
    history = summary["history"]
    return {
        "bytes_per_step": summary["bytes_per_step"],
        "wire_bytes_per_step": summary["wire_bytes_per_step"],
        "dense_bytes_per_step": summary["dense_bytes_per_step"],
        "total_bytes": summary["total_bytes"],
        "final_val_loss": history[-1]["val_loss"] if history else summary["val_loss"],
        "history": history,
        "wall_s": summary["wall_s"],
        "replicas_identical": summary["replicas_identical"],
    }


def first_reaching(history: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """The first logged point whose val loss is at or below ``target``."""
    if target is None:
        return None
    return next((point for point in history if point["val_loss"] <= target), None)


def loss_at_bytes(history: list[dict[str, Any]], total_bytes: float) -> float | None:
    """A curve's val loss at ``total_bytes`` cumulative bytes: linear in log(bytes) between its
    logged points, its first logged loss before them (a loss it had not yet reached with so few
    bytes, so the comparison leans its way), None past its last point."""
    points = [(math.log(p["total_bytes"]), p["val_loss"]) for p in history if p["total_bytes"] > 0]
    if not points or total_bytes <= 0:
        return None
    x = math.log(total_bytes)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def below_baseline(history: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> bool | None:
    """Whether every logged point is below the baseline's curve at the same cumulative bytes
    (where the baseline has a point at those bytes); None when no point can be compared."""
    compared = [
        (point["val_loss"], reference)
        for point in history
        if (reference := loss_at_bytes(baseline, point["total_bytes"])) is not None
    ]
    return all(loss < reference for loss, reference in compared) if compared else None


def add_derived_fields(record: dict[str, Any], target: float | None, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Add steps/bytes to target, the compression ratio and the comparison with the baseline."""
    if "history" not in record:
        return record
    reached = first_reaching(record["history"], target)
    record["steps_to_target"] = reached["step"] if reached else None
    record["bytes_to_target"] = reached["total_bytes"] if reached else None
    record["compression_ratio"] = record["dense_bytes_per_step"] / record["bytes_per_step"]
    if baseline is not None and record is not baseline:
        record[f"below_{BASELINE}_at_equal_bytes"] = below_baseline(record["history"], baseline["history"])
    return record


def earlier_records(path: Path, settings: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Method records of the results file at ``path`` if it was measured the same way on this machine."""
    earlier = common.earlier_results(path, settings, machine)
    if earlier is None:
        return []
    for record in earlier["methods"]:
        record.setdefault("steps", settings["steps"])  # runs from before per-run steps were recorded
    return earlier["methods"]


def variant(record: dict[str, Any]) -> tuple[str, int, str | None, str | None]:
    """What a table row stands for: a method run for a number of steps, its bases refreshed its way, on its data."""
    return record["method"], record["steps"], record.get("refresh"), data_label(record.get("data"))


def run_key(record: dict[str, Any]) -> tuple[str, int, str | None, str | None, float]:
    return *variant(record), record["lr"]


def merge_records(earlier: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh records replace earlier ones of the same (method, steps, lr); dense first, then the earlier order."""
    fresh_by_key = {run_key(record): record for record in fresh}
    merged = [fresh_by_key.pop(run_key(record), record) for record in earlier] + list(fresh_by_key.values())
    return sorted(merged, key=lambda record: record["method"] != "dense")


def best_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant's run at its best peak lr: the lowest final val loss among the runs that
    finished without error (any run if none did), in the records' order."""
    best: dict[tuple[str, int, str | None, str | None], dict[str, Any]] = {}
    for record in records:
        current = best.get(variant(record))
        if current is None or sort_key(record) < sort_key(current):
            best[variant(record)] = record
    return list(best.values())


def sort_key(record: dict[str, Any]) -> tuple[bool, float]:
    return "error" in record or "final_val_loss" not in record, record.get("final_val_loss", math.inf)


def dense_final(best: list[dict[str, Any]], steps: int, data: str | None = None) -> float | None:
    """Dense's final val loss at its best lr, on the data labelled ``data`` (None: the headline's)."""
    dense = next((r for r in best if variant(r) == ("dense", steps, None, data) and "final_val_loss" in r), None)
    return None if dense is None else dense["final_val_loss"]


def target_loss(best: list[dict[str, Any]], steps: int, data: str | None = None) -> tuple[float | None, str]:
    """Within 2% of dense's final val loss (on the same data) and a note saying so, or None and why not."""
    final = dense_final(best, steps, data)
    if final is None:
        return None, "no dense run with these settings, in this selection or in the earlier results file: no target"
    return final * TARGET_SLACK, f"within {TARGET_SLACK - 1:.0%} of dense's final val loss {final:.4f}"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected methods at each lr one after another, merged into the earlier results measured the same way."""
    settings, machine = run_settings(args), common.machine_description()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    runs = [(name, lr) for name in selected_methods(args.methods) for lr in args.lrs or [get_method(name).lr]]
    steps = round(args.steps * args.steps_factor)
    data = run_data(args, settings)
    fresh = []
    with logging_redirect_tqdm():
        for name, lr in (bar := tqdm(runs, desc="runs", unit="run")):
            bar.set_postfix_str(f"{name} lr {lr:g}")
            record = run_method(name, lr, steps, settings, args.timeout_s, args.adaptive_refresh, data)
            fresh.append({**record, "command": command})
            log.info("%s at lr %g: %s", name, lr, outcome(fresh[-1]))
    return derive({
        "machine": machine,
        "method_note": method_note(settings),
        "settings": settings,
        "command": command,
        "methods": merge_records(earlier_records(args.out, settings, machine), fresh),
    })


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """The targets (one per data split and seed), and every record's fields measured against its
    data's target and baseline and against dense on the same data."""
    steps = results["settings"]["steps"]
    for record in results["methods"]:
        record.setdefault("steps", steps)  # as in earlier_records
    best = best_runs(results["methods"])
    for record in results["methods"]:
        data = data_label(record.get("data"))
        baseline = next((r for r in best if variant(r) == (BASELINE, steps, None, data) and r.get("history")), None)
        target = target_loss(best, steps, data)[0]
        add_derived_fields(record, target, baseline)
        if target is not None and "final_val_loss" in record:
            record["gap_to_dense"] = record["final_val_loss"] * TARGET_SLACK / target - 1  # target = dense * slack
    target, target_note = target_loss(best, steps)
    return {**results, "target_val_loss": target, "target_note": target_note}


def outcome(record: dict[str, Any]) -> str:
    """One log line's worth of a method record."""
    if "final_val_loss" not in record:
        return f"FAILED: {record['error']}"
    text = f"val loss {record['final_val_loss']:.4f}, {common.human_bytes(record['bytes_per_step'])}/step, {record['wall_s']:.0f} s"
    return f"{text}; ERROR: {record['error']}" if "error" in record else text


def caption(results: dict[str, Any]) -> str:
    """The measurement note printed under each figure."""
    settings = results["settings"]
    return (
        f"{settings['workers']} workers, {settings['backend'].capitalize()}, {common.machine_line(results['machine'])}, "
        f"{settings['steps']} steps, seed {settings['seed']}, each method at its best swept peak lr; "
        "payload bytes per worker as counted by disttrain (scales and basis broadcasts included)"
    )


def plot(results: dict[str, Any], x_key: str, x_name: str, path: Path, log_x: bool) -> None:
    """One line per method at its best lr: val loss against ``x_key`` of the history."""
    fig, ax = plt.subplots(figsize=(14, 6))  # the legend sits right of the axes, off the curves
    colors = plt.get_cmap("tab20").colors  # enough distinct colours for every method of the study
    plotted = [record for record in best_runs(results["methods"]) if record.get("history")]
    for index, record in enumerate(plotted):
        xs = [point[x_key] for point in record["history"]]
        style = "--" if get_method(record["method"]).compression.quantized else "-"
        losses = [point["val_loss"] for point in record["history"]]
        ax.plot(
            xs, losses, style, color=colors[index % len(colors)], marker=MARKERS[index // len(colors) % len(MARKERS)], markersize=3,
            label=f"{label(record, results)} (lr {record['lr']:g})",
        )
    if results["target_val_loss"] is not None:
        ax.axhline(results["target_val_loss"], color="grey", linestyle=":", linewidth=1, label="target (dense final + 2%)")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x_name} (log scale)" if log_x else x_name)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"{results['settings'].get('model', common.DEFAULT_MODEL)} GPT: validation loss vs {x_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="dashed: quantised payload", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.text(0.5, 0.01, caption(results), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(results: dict[str, Any], out: Path) -> None:
    """Write the loss-vs-bytes and loss-vs-steps PNGs next to the results file ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, "total_bytes", "cumulative payload bytes per worker", out.with_name(f"{out.stem}_loss_vs_bytes.png"), log_x=True)
    plot(results, "step", "training step", out.with_name(f"{out.stem}_loss_vs_steps.png"), log_x=False)
    log.info("plots written to %s", out.parent)


def label(record: dict[str, Any], results: dict[str, Any]) -> str:
    """The method's name, with its step count when it differs from the headline's and its refresh
    when it is not the method's own."""
    notes = [f"{record['steps']} steps"] if record["steps"] != results["settings"]["steps"] else []
    notes += [f"refresh {record['refresh']}"] if record.get("refresh") else []
    notes += [data_label(record["data"])] if record.get("data") else []
    return f"{record['method']} ({', '.join(notes)})" if notes else record["method"]


def sweep_text(record: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """'lr: final loss' for every run of ``record``'s variant, lowest lr first."""
    runs = sorted((r for r in records if variant(r) == variant(record)), key=lambda r: r["lr"])
    return ", ".join(f"{r['lr']:g}: {r['final_val_loss']:.3f}" if "final_val_loss" in r else f"{r['lr']:g}: failed" for r in runs)


def table_row(record: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """One variant's row of the table (its best run), with its whole lr sweep."""
    records = results["methods"]
    if "final_val_loss" not in record:
        return [f"{label(record, results)} (failed)"] + ["—"] * 9 + [sweep_text(record, records)]
    steps = record["steps_to_target"]
    name = f"{label(record, results)} (error)" if "error" in record else label(record, results)
    below = record.get(f"below_{BASELINE}_at_equal_bytes")
    return [
        name,
        common.human_bytes(record["bytes_per_step"]),
        common.human_bytes(record.get("wire_bytes_per_step")),  # absent from runs before it was recorded
        f"{record['compression_ratio']:.1f}x",
        f"{record['final_val_loss']:.4f}",
        "—" if record.get("gap_to_dense") is None else f"{record['gap_to_dense']:+.1%}",
        "not reached" if steps is None else str(steps),
        common.human_bytes(record["bytes_to_target"]),
        "—" if below is None else ("yes" if below else "no"),
        f"{record['wall_s']:.0f}",
        sweep_text(record, records),
    ]


def base_command(settings: dict[str, Any]) -> str:
    """The invocation that measures with ``settings`` (sweeps and extra rows add their own flags)."""
    words = ["python", "benchmarks/convergence.py"]
    if "model" in settings:
        words += ["--model", settings["model"]]
    if (settings["steps"], settings["eval_every"]) == (SMALL_STEPS, SMALL_EVAL_EVERY):
        words.append("--small")
    elif (settings["steps"], settings["eval_every"]) != (FULL_STEPS, FULL_EVAL_EVERY):
        words += ["--steps", str(settings["steps"]), "--eval-every", str(settings["eval_every"])]
    return shlex.join(words)


def default_results_file(settings: dict[str, Any]) -> Path:
    """Where the results measured with ``settings`` are kept unless --out said otherwise."""
    if settings.get("model", common.DEFAULT_MODEL) != common.DEFAULT_MODEL:
        return common.RESULTS_DIR / f"convergence-{settings['model']}.json"
    small = (settings["steps"], settings["eval_every"]) == (SMALL_STEPS, SMALL_EVAL_EVERY)
    return common.RESULTS_DIR / ("convergence-small.json" if small else "convergence.json")


def render_table(results: dict[str, Any], results_file: Path | None = None) -> str:
    """The table, with a line saying how it was measured and one saying how it was made."""
    headers = [
        "method", "bytes/step", "wire/step", "x fewer bytes than dense", "final val loss", "vs dense", "steps to target",
        "bytes to target", f"below {BASELINE} at equal bytes", "wall s", "lr sweep (peak lr: final val loss)",
    ]
    records = results["methods"]
    table = common.markdown_table(headers, [table_row(record, results) for record in best_runs(records)])
    target = results["target_val_loss"]
    results_file = results_file or default_results_file(results["settings"])
    generated = common.generated_by(base_command(results["settings"]), results_file, runs=len(records))
    target_text = f"target = {target:.4f} ({results['target_note']})" if target is not None else results["target_note"]
    return (
        f"{table}\n\n"
        f"Measured on {common.machine_line(results['machine'])}: {results['method_note']}. "
        f"Each row is the method at its best peak lr. Steps/bytes to target are the first eval at or below the {target_text}; "
        "rows on other data (contiguous shards, another seed) are measured against dense on the same data, and so is 'vs dense'. "
        f"{generated}"
    )


def render(results: dict[str, Any], documents: list[Path], out: Path) -> bool:
    """Plots and the table (next to ``out``, in docs/benchmarks.md and the write-up) from a results
    document, and the figures `disttrain methods` ships; False if a document was not updated."""
    plot_all(results, out)
    method_listing.write_measured(common.RESULTS_DIR)
    table, marker = render_table(results, out), f"{out.stem}-table"
    return all([common.publish_table(table, marker, document, out.parent) for document in documents])


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args))
    if results is None:
        return 2
    return 0 if render(derive(results), [args.doc, args.study_doc], args.out) else 1


if __name__ == "__main__":
    sys.exit(main())

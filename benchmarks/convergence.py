"""Convergence benchmark: every method trains the small GPT with 4 local workers on the same
seed, data and steps; records val loss against steps, payload bytes and wall-clock, plots it,
and regenerates the README table from the JSON. Re-running some methods replaces their rows
in the results file (if it was measured with the same settings on this machine) and keeps the rest.

    python benchmarks/convergence.py                 # all methods, 300 steps
    python benchmarks/convergence.py --small         # 100 steps, ~15 min on 2 cores
    python benchmarks/convergence.py --methods dense,svd-projected
    python benchmarks/convergence.py --render-only   # plots + table from the existing JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from disttrain.launcher.local import launch_local  # noqa: E402
from disttrain.methods import get_method  # noqa: E402
from disttrain.train.config import TrainConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
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
FULL_STEPS, FULL_EVAL_EVERY = 300, 25
SMALL_STEPS, SMALL_EVAL_EVERY = 100, 20
MARKER = "convergence-table"
LOGS_DIR = common.RESULTS_DIR / "logs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    parser.add_argument("--steps", type=int, help=f"training steps (default {FULL_STEPS}, {SMALL_STEPS} with --small)")
    parser.add_argument("--eval-every", type=int, help=f"steps between evals (default {FULL_EVAL_EVERY}, {SMALL_EVAL_EVERY} with --small)")
    parser.add_argument("--small", action="store_true", help="quick mode: fewer steps, all methods in ~15 min on 2 cores")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up on one method's run after this long")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "convergence.json")
    parser.add_argument("--readme", type=Path, default=common.REPO_ROOT / "README.md")
    parser.add_argument("--render-only", action="store_true", help="only redraw plots and the table from --out")
    args = parser.parse_args(argv)
    args.steps = args.steps or (SMALL_STEPS if args.small else FULL_STEPS)
    args.eval_every = args.eval_every or (SMALL_EVAL_EVERY if args.small else FULL_EVAL_EVERY)
    return args


def selected_methods(spec: str) -> list[str]:
    """Validated method names, dense first (its final loss is everyone's target)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        get_method(name)
    return sorted(dict.fromkeys(names), key=lambda name: name != "dense")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run shares, from the flags and TrainConfig's defaults."""
    defaults = TrainConfig()
    return {
        "workers": WORKERS,
        "backend": "gloo",
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seed": defaults.seed,
        "batch_size_per_worker": defaults.data.batch_size,
        "block_size": defaults.data.block_size,
        "lr": args.lr or defaults.optim.lr,
    }


def method_note(settings: dict[str, Any]) -> str:
    """How the numbers were measured, in one sentence."""
    return (
        f"{settings['workers']} local worker processes ({settings['backend']}), {settings['steps']} steps, "
        f"batch {settings['batch_size_per_worker']} x {settings['block_size']} tokens per worker, seed {settings['seed']}, "
        f"peak lr {settings['lr']:g}; val loss every {settings['eval_every']} steps; bytes are payload bytes "
        "as counted by the library per worker per step, not wire bytes"
    )


def worker_flags(method: str, settings: dict[str, Any], summary_file: Path) -> list[str]:
    """Flags for ``python -m disttrain.launcher``."""
    return [
        "--method", method,
        "--steps", str(settings["steps"]),
        "--eval_every", str(settings["eval_every"]),
        "--seed", str(settings["seed"]),
        "--optim.lr", str(settings["lr"]),
        "--summary-file", str(summary_file),
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


def run_method(name: str, settings: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Train with one method; its record, with an ``error`` field if the run failed."""
    summary_file, log_file = LOGS_DIR / f"{name}.summary.json", LOGS_DIR / f"{name}.log"
    summary_file.unlink(missing_ok=True)
    record: dict[str, Any] = {"method": name, "summary": get_method(name).summary, "log": str(log_file.relative_to(common.REPO_ROOT))}
    try:
        with output_to(log_file):
            code = launch_local(WORKERS, worker_flags(name, settings, summary_file), timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
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


def add_derived_fields(record: dict[str, Any], target: float | None) -> dict[str, Any]:
    """Add steps/bytes to target and the compression ratio to a method record."""
    if "history" not in record:
        return record
    reached = first_reaching(record["history"], target)
    record["steps_to_target"] = reached["step"] if reached else None
    record["bytes_to_target"] = reached["total_bytes"] if reached else None
    record["compression_ratio"] = record["dense_bytes_per_step"] / record["bytes_per_step"]
    return record


def earlier_records(path: Path, settings: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Method records of the results file at ``path`` if it was measured the same way on this machine."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != settings or earlier.get("machine") != machine:
        log.info("%s was measured with other settings or on another machine: not merging it", path)
        return []
    return earlier["methods"]


def merge_records(earlier: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh records replace earlier ones of the same method; dense first, then the earlier order."""
    fresh_by_name = {record["method"]: record for record in fresh}
    merged = [fresh_by_name.pop(record["method"], record) for record in earlier] + list(fresh_by_name.values())
    return sorted(merged, key=lambda record: record["method"] != "dense")


def target_loss(records: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The dense run's final val loss and a note saying so, or None and a note saying why not."""
    dense = next((r for r in records if r["method"] == "dense" and "final_val_loss" in r), None)
    if dense is None:
        return None, "no dense run with these settings, in this selection or in the earlier results file: no target"
    return dense["final_val_loss"], "final val loss of dense"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected methods one after another, merged into the earlier results measured the same way."""
    settings, machine = run_settings(args), common.machine_description()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    fresh = []
    with logging_redirect_tqdm():
        for name in (bar := tqdm(selected_methods(args.methods), desc="methods", unit="method")):
            bar.set_postfix_str(name)
            fresh.append({**run_method(name, settings, args.timeout_s), "command": command})
            log.info("%s: %s", name, outcome(fresh[-1]))
    records = merge_records(earlier_records(args.out, settings, machine), fresh)
    target, target_note = target_loss(records)
    return {
        "machine": machine,
        "method_note": method_note(settings),
        "settings": settings,
        "target_val_loss": target,
        "target_note": target_note,
        "command": command,
        "methods": [add_derived_fields(record, target) for record in records],
    }


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
        f"{settings['steps']} steps, seed {settings['seed']}; payload bytes per worker as counted by disttrain (not wire bytes)"
    )


def plot(results: dict[str, Any], x_key: str, x_name: str, path: Path, log_x: bool) -> None:
    """One line per method: val loss against ``x_key`` of the history."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for record in results["methods"]:
        if record.get("history"):
            xs = [point[x_key] for point in record["history"]]
            style = "--" if get_method(record["method"]).compression.payload == "int8" else "-"
            losses = [point["val_loss"] for point in record["history"]]
            ax.plot(xs, losses, style, marker="o", markersize=3, label=record["method"])
    if results["target_val_loss"] is not None:
        ax.axhline(results["target_val_loss"], color="grey", linestyle=":", linewidth=1, label="target (dense final)")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x_name} (log scale)" if log_x else x_name)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Small GPT: validation loss vs {x_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="dashed: int8 payload", title_fontsize=8)
    fig.text(0.5, 0.01, caption(results), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(results: dict[str, Any], out_dir: Path) -> None:
    """Write the loss-vs-bytes and loss-vs-steps PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, "total_bytes", "cumulative payload bytes per worker", out_dir / "convergence_loss_vs_bytes.png", log_x=True)
    plot(results, "step", "training step", out_dir / "convergence_loss_vs_steps.png", log_x=False)
    log.info("plots written to %s", out_dir)


def table_row(record: dict[str, Any]) -> list[str]:
    """One method's row of the README table."""
    if "final_val_loss" not in record:
        return [f"{record['method']} (failed)"] + ["—"] * 6
    steps = record["steps_to_target"]
    name = f"{record['method']} (error)" if "error" in record else record["method"]
    return [
        name,
        common.human_bytes(record["bytes_per_step"]),
        f"{record['compression_ratio']:.1f}x",
        f"{record['final_val_loss']:.4f}",
        "not reached" if steps is None else str(steps),
        common.human_bytes(record["bytes_to_target"]),
        f"{record['wall_s']:.0f}",
    ]


def render_table(results: dict[str, Any]) -> str:
    """The README table, with a line saying how it was measured."""
    headers = ["method", "bytes/step", "x smaller than dense", "final val loss", "steps to target", "bytes to target", "wall s"]
    table = common.markdown_table(headers, [table_row(record) for record in results["methods"]])
    target = results["target_val_loss"]
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in results["methods"]))
    target_text = f"target = {target:.4f} ({results['target_note']})" if target is not None else results["target_note"]
    return (
        f"{table}\n\n"
        f"Measured on {common.machine_line(results['machine'])}: {results['method_note']}. "
        f"Steps/bytes to target are the first eval at or below the {target_text}. "
        f"Generated by {commands}."
    )


def render(results: dict[str, Any], readme: Path, out_dir: Path) -> bool:
    """Plots and the table (in ``out_dir`` and the README) from a results document; False if the README was not updated."""
    plot_all(results, out_dir)
    return common.publish_table(render_table(results), MARKER, readme, out_dir)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args))
    if results is None:
        return 2
    return 0 if render(results, args.readme, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())

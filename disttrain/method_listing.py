"""`disttrain methods`: the registered methods grouped for a user, with the convergence study's figures.

The figures live in disttrain/data/measured.json so an installed package has them too;
``write_measured`` derives that file from benchmarks/results, and benchmarks/convergence.py calls
it whenever it renders its tables (``python benchmarks/convergence.py --render-only`` refreshes it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from disttrain.methods import DEFAULT_FEDERATED_METHOD, DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD, MEMORY_LEAN_METHOD, METHODS

MEASURED_FILE = Path(__file__).with_name("data") / "measured.json"
STUDIES = ("convergence.json", "convergence-lean.json", "convergence-small.json")  # the 1000-step studies first: their figures win
RECOMMENDED = {
    DEFAULT_METHOD: "default of `disttrain train`, the demo, `disttrain.Session` and the Hugging Face Trainer",
    DEFAULT_PER_STEP_METHOD: "the best that exchanges every step: `Session(model, optimizer, \"power-int4-r16\")`",
    DEFAULT_FEDERATED_METHOD: "default of `disttrain train --mode federated`",
    MEMORY_LEAN_METHOD: "the memory-constrained choice: the default's bytes and loss in 0.75x AdamW's state",
}
SHORT_LIST = 5  # other methods shown without --all: the measured ones with the lowest loss
HEADER = ["method", "peak lr", "bytes/step vs dense", "convergence study"]

Run = dict[str, Any]  # one method's best run: steps, lr, val_loss, bytes_per_step, dense_bytes_per_step


def best_runs(results: dict[str, Any]) -> dict[str, Run]:
    """Each method's lowest final val loss in one study's results, among its error-free runs as registered."""
    steps = results["settings"]["steps"]
    best: dict[str, Run] = {}
    for record in results["methods"]:
        as_registered = record.get("steps", steps) == steps and "refresh" not in record and "data" not in record
        if not as_registered or "error" in record or "final_val_loss" not in record:
            continue
        current = best.get(record["method"])
        if current is None or record["final_val_loss"] < current["val_loss"]:
            best[record["method"]] = {
                "steps": steps,
                "lr": record["lr"],
                "val_loss": record["final_val_loss"],
                "bytes_per_step": record["bytes_per_step"],
                "dense_bytes_per_step": record["dense_bytes_per_step"],
            }
    return best


def derive_measured(results_dir: Path) -> dict[str, Run]:
    """Each measured method's best run in the first of STUDIES that measured it."""
    measured: dict[str, Run] = {}
    for study in STUDIES:
        for name, run in best_runs(json.loads((results_dir / study).read_text())).items():
            measured.setdefault(name, run)
    return measured


def write_measured(results_dir: Path) -> None:
    """Regenerate the shipped MEASURED_FILE from the benchmark results in ``results_dir``."""
    document = {
        "generated_by": f"disttrain.method_listing.write_measured from {', '.join(STUDIES)}",
        "methods": derive_measured(results_dir),
    }
    MEASURED_FILE.write_text(json.dumps(document, indent=1) + "\n")


def load_measured() -> dict[str, Run]:
    """The shipped figures, by method name."""
    return json.loads(MEASURED_FILE.read_text())["methods"]


def bytes_text(run: Run | None) -> str:
    """Bytes per step relative to dense fp32, as measured."""
    if run is None:
        return "-"
    ratio = run["dense_bytes_per_step"] / run["bytes_per_step"]
    return "as dense" if ratio < 1.05 else f"{ratio:.0f}x fewer" if ratio >= 10 else f"{ratio:.1f}x fewer"


def result_text(name: str, run: Run | None) -> str:
    """The measured final val loss, with the peak lr it was measured at when that is not the method's own."""
    if run is None:
        return "not measured"
    text = f"val loss {run['val_loss']:.3f} @{run['steps']} steps"
    return text if run["lr"] == METHODS[name].lr else f"{text} (at lr {run['lr']:g})"


def row(name: str, measured: dict[str, Run], *notes: str) -> list[str]:
    """One method's cells."""
    run = measured.get(name)
    return [name, f"{METHODS[name].lr:g}", bytes_text(run), result_text(name, run), *notes]


def listing_order(run: Run | None) -> tuple[float, float]:
    """Sort key: the longer study's runs first, lower loss first, unmeasured methods last."""
    return (math.inf, 0.0) if run is None else (-run["steps"], run["val_loss"])


def aligned(cells: list[str], widths: list[int]) -> str:
    """A row with its cells padded to the column widths."""
    return "  " + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def render(show_all: bool = False) -> str:
    """Recommended methods, baselines, then the study's other methods (the best few unless ``show_all``)."""
    measured = load_measured()
    baselines = [name for name, method in METHODS.items() if method.role == "baseline" and name not in RECOMMENDED]
    others = [name for name in METHODS if name not in RECOMMENDED and name not in baselines]
    others.sort(key=lambda name: listing_order(measured.get(name)))
    shown = others if show_all else [name for name in others if name in measured][:SHORT_LIST]
    other_title = "Other methods of the convergence study"
    if not show_all:
        other_title += f" ({len(shown)} of {len(others)}, the lowest losses; `disttrain methods --all` shows all {len(METHODS)})"
    sections = [
        ("Recommended", [row(name, measured, role) for name, role in RECOMMENDED.items()]),
        ("Baselines", [row(name, measured) for name in baselines]),
        (other_title, [row(name, measured) for name in shown]),
    ]
    table = [HEADER, *(cells for _, rows in sections for cells in rows)]
    widths = [max(len(cells[i]) for cells in table if i < len(cells)) for i in range(max(map(len, table)))]
    lines = [aligned(HEADER, widths)]
    for title, rows in sections:
        lines += ["", title, *(aligned(cells, widths) for cells in rows)]
    in_study = sum(name in measured for name in METHODS)
    summary = (
        f"{len(METHODS)} methods: {len(RECOMMENDED)} recommended, {len(baselines)} baselines, {len(others)} others; "
        f"{in_study} measured by the convergence study (the small GPT, each at its best swept peak lr: docs/convergence.md)."
    )
    return "\n".join([*lines, "", summary])

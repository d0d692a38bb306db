"""Nodes benchmark: a node of several processes as one worker (--inner ddp) against every process a worker.

The cluster benchmark's lab with one network namespace per node: a node's processes share its
namespace (their node group runs on its loopback), and only the node's link to the bridge is
capped, with tc tbf both ways. Four processes in all, with the same per-process batch, so every
layout trains the same global batch of the same model: 2 nodes x 2 processes with the node as
the worker (`ddp`), the same 2 x 2 with every process a worker (`flat`), and 4 nodes of one
process. Per run: the bytes each node sent on its link per step (tx_bytes of its interface), its
ratio to the flat 2 x 2 layout's, time to the target loss (uncapped DDP's at half the steps)
against the compute-bound limit of the same layout (DDP uncapped), and the final loss. DDP on the
capped links is stopped once its step time is measured and extrapolated, as in the cluster
benchmark. Needs root and iproute2.

    python benchmarks/nodes.py                 # both rates (about 30 minutes on 2 cores)
    python benchmarks/nodes.py --render-only   # the table from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from disttrain.methods import DEFAULT_METHOD

sys.path.append(str(Path(__file__).resolve().parent))  # siblings also when run via `disttrain bench`
import common  # noqa: E402
from cluster import LIMIT, Run, Runner, Settings, early_stop, interpolate_crossing  # noqa: E402
from netlab import ready_for  # noqa: E402

log = logging.getLogger("benchmarks.nodes")

PROCESSES = 4
LAYOUTS = {"2x2": (2, 2), "4x1": (4, 1)}  # name: (nodes, processes per node)
# Goals (issue #20): a node's slow-link bytes one payload, not G; time to target <= 1.2x the limit;
# loss as the flat layout's; FSDP2's parameter + optimizer state per process about 1/G of DDP's.
MARKER = "nodes-table"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row's layout: the nodes, and who a worker is."""

    layout: str
    inner: str
    method: str = DEFAULT_METHOD

    @property
    def label(self) -> str:
        return f"{self.method}, {self.layout}, inner {self.inner}"


# torch DDP over every process is the baseline; --inner does not apply to it (auto is flat there).
CASES = (Case("2x2", "ddp"), Case("2x2", "fsdp"), Case("2x2", "flat"), Case("4x1", "flat"), Case("2x2", "auto", LIMIT))
FLAT_REFERENCE = Case("2x2", "flat")  # every process a worker, on the same nodes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="20,10", help="comma-separated link rates in Mbit/s (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of every run (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between evaluations (default: %(default)s)")
    parser.add_argument("--max-run-s", type=float, default=300.0, help="capped DDP runs expected to take longer stop early")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up on one run after this long")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "nodes.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only redraw the table from --out")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, layout: str) -> Settings:
    nodes, per_node = LAYOUTS[layout]
    return Settings(
        workers=nodes, per_node=per_node, steps=args.steps, eval_every=args.eval_every,
        target_step=args.steps // 2 // args.eval_every * args.eval_every, headline_mbit=0.0,
        calibration_steps=2 * args.eval_every, max_run_s=args.max_run_s, small=False,
    )


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    rates = [float(rate) for rate in args.rates.split(",")]
    logs_dir = args.out.parent / "logs" / "nodes"
    total = len(LAYOUTS) + len(CASES) + len(rates) * len(CASES)
    with logging_redirect_tqdm():
        run = Runner(logs_dir, args.timeout_s, total)
        limits = {layout: run(Run(LIMIT, None), settings_for(args, layout), role="limit", layout=layout) for layout in LAYOUTS}
        for case in CASES:
            if case.method != LIMIT:
                run(Run(case.method, None, inner=case.inner), settings_for(args, case.layout), role="uncapped", **case_fields(case))
        for rate in rates:
            for case in CASES:
                settings = settings_for(args, case.layout)
                planned = early_stop(Run(case.method, rate, inner=case.inner), settings, limits[case.layout])
                run(planned, settings, role="capped", **case_fields(case))
        run.bar.close()
    return {
        "machine": common.machine_description(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "steps": args.steps, "eval_every": args.eval_every, "target_step": settings_for(args, "2x2").target_step,
            "processes": PROCESSES, "rates_mbit": rates,
        },
        "runs": run.records,
    }


def case_fields(case: Case) -> dict[str, Any]:
    return {"layout": case.layout, "inner": case.inner, "case": case.label}


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Per capped run: slow-link bytes per node per step, their ratio to the flat layout's, time to target, x the limit."""
    runs = results["runs"]
    limits = {r["layout"]: r for r in runs if r["role"] == "limit"}
    target_step = results["settings"]["target_step"]
    target = next(p["val_loss"] for p in limits["2x2"]["history"] if p["step"] == target_step)
    limit_times = {layout: interpolate_crossing(r["history"], target, "wall_s") for layout, r in limits.items()}
    limit_steps = interpolate_crossing(limits["2x2"]["history"], target, "step")
    uncapped = {r["case"]: r for r in runs if r["role"] == "uncapped"}
    rows = []
    for record in (r for r in runs if r["role"] == "capped"):
        time = interpolate_crossing(record["history"], target, "wall_s")
        extrapolated = time is None and record["method"] == LIMIT and record["stop_at"] is not None
        if extrapolated:
            time = limit_steps * record["step_s"]
        base = limits[record["layout"]] if record["method"] == LIMIT else uncapped[record["case"]]
        rows.append({
            "case": record["case"], "method": record["method"], "layout": record["layout"], "inner": record["inner"],
            "rate_mbit": record["rate_mbit"], "node_tx_bytes_per_step": record["wire_bytes_per_step"],
            "counted_bytes_per_worker_step": record["payload_bytes_per_step"],
            "time_to_target_s": time, "extrapolated": extrapolated,
            "x_limit": None if time is None else time / limit_times[record["layout"]],
            "final_val_loss": None if extrapolated else record["final_val_loss"], "step_s": record["step_s"],
            "comm_share": max(0.0, 1 - base["step_s"] / record["step_s"]),
            "model_state_bytes": _held(record, "parameters", "optimizer"),
            "exchange_state_bytes": _held(record, "exchange"),
            "peak_rss_bytes": record.get("peak_rss_bytes"),
        })
    for row in rows:
        flat = next(r for r in rows if r["case"] == FLAT_REFERENCE.label and r["rate_mbit"] == row["rate_mbit"])
        row["bytes_vs_flat"] = row["node_tx_bytes_per_step"] / flat["node_tx_bytes_per_step"]
    results.update(target_val_loss=target, limit_time_to_target_s=limit_times, rows=rows)
    return results


def _held(record: dict[str, Any], *kinds: str) -> int | None:
    """Bytes of ``kinds`` that rank 0 held at the end of the run (none for a run stopped mid-round)."""
    held = record.get("held_bytes") or {}
    return sum(held.get(kind, 0) for kind in kinds) if held else None


def _number(value: float | None, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def render_table(results: dict[str, Any], out: Path) -> str:
    headers = ["link", "method", "layout", "inner", "slow-link bytes/step per node (tx_bytes)", "vs flat 2x2",
               "time to target (s)", "x the limit", f"val loss @ {results['settings']['steps']}", "s/step", "comm % of step",
               "parameters + optimizer per process", "exchange state per process", "peak RSS per process"]
    rows = []
    for row in sorted(results["rows"], key=lambda r: (-r["rate_mbit"], r["method"] == LIMIT, r["layout"], r["inner"])):
        time = _number(row["time_to_target_s"], ".0f", "not reached") + ("*" if row["extrapolated"] else "")
        rows.append([
            f"{row['rate_mbit']:g} Mbit/s", row["method"], row["layout"], "—" if row["method"] == LIMIT else row["inner"],
            common.human_bytes(row["node_tx_bytes_per_step"]), f"{row['bytes_vs_flat']:.2f}x", time,
            _number(row["x_limit"], ".2f"), _number(row["final_val_loss"], ".3f"), f"{row['step_s']:.2f}",
            f"{100 * row['comm_share']:.0f}", common.human_bytes(row["model_state_bytes"]),
            common.human_bytes(row["exchange_state_bytes"]), common.human_bytes(row["peak_rss_bytes"]),
        ])
    limits = results["limit_time_to_target_s"]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"{results['settings']['processes']} processes in every layout, the same per-process batch (so the same global batch), "
        f"the bundled GPT; one network namespace per node, its processes on its loopback, its link capped with tc tbf both ways. "
        f"Target: val loss {results['target_val_loss']:.4f}, uncapped DDP's at step {results['settings']['target_step']}; the limit is "
        f"uncapped DDP's time to it in the same layout ({', '.join(f'{k}: {v:.0f} s' for k, v in limits.items())}). "
        "inner ddp: a node is one worker (DDP inside, each local rank exchanging its share between nodes); flat: every process "
        "a worker; fsdp: a node is one worker with FSDP2 inside. Per process: the parameters and optimizer state, and the "
        "exchange's state (round start, outer momentum, vote momentum, residuals), that rank 0 holds between rounds (its "
        "shards under FSDP2); peak RSS: rank 0's whole process. Comm % = 1 - the run's uncapped step time / its capped one. \\* DDP stopped once its step time was measured: "
        f"its uncapped steps to target x its capped step time. Measured on {common.machine_line(results['machine'])}. "
        f"{common.generated_by(results['command'], out)}"
    )


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    if not args.render_only and not ready_for("nodes benchmark"):
        return 0
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args))
    if results is None:
        return 2
    results = derive(results)
    common.save_results(args.out, results)  # with every run's derived row
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())

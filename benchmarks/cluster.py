"""Low-bandwidth cluster benchmark: DDP, PowerSGD and disttrain on real, capped links.

One worker per network namespace, every link capped with `tc tbf` in both directions, the
coordinator on the bridge (see netlab.py). For each method and rate: time to a target
validation loss (the uncapped DDP run's loss at a fixed step), loss against wall-clock and
bytes, payload bytes per step as counted by the library, wire bytes per step from the
interfaces' tx_bytes counters, and the share of step time spent communicating. Needs root and
iproute2; without them it says what is missing and exits 0 having done nothing.

    python benchmarks/cluster.py                # the full run (about an hour on 2 cores)
    python benchmarks/cluster.py --small        # a tiny model, 4 methods, 20 Mbit/s: a few minutes
    python benchmarks/cluster.py --render-only  # plots + the table in docs/benchmarks.md from the JSON
    disttrain bench cluster --small             # the same, from the CLI
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from disttrain.elastic.protocol import SECRET_ENV  # noqa: E402
from disttrain.launcher.local import TIMED_OUT, wait_for_workers, worker_env  # noqa: E402
from disttrain.methods import DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD, get_method  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # siblings also when run via `disttrain bench`
import common  # noqa: E402
from netlab import HOST_INTERFACE, HUB_ADDRESS, NetLab, ready_for  # noqa: E402

log = logging.getLogger("benchmarks.cluster")

LIMIT = "ddp"  # the method whose uncapped run is the compute-bound limit and sets the target
HEADLINE_METHODS = (
    "ddp", "powersgd-r1", "powersgd-r4", "powersgd-r8", "svd-reconstruct", "svd-int8-reconstruct",
    "seeded-reconstruct", "seeded-int8-reconstruct", "diloco-int8-h30", "diloco-svd-int8-h10", DEFAULT_PER_STEP_METHOD,
    DEFAULT_METHOD,
)
OTHER_RATE_METHODS = ("ddp", "powersgd-r4", DEFAULT_METHOD, "diloco-int8-h30")
SMALL_METHODS = ("ddp", "powersgd-r4", DEFAULT_METHOD, "diloco-int8-h30")
SMALL_MODEL_FLAGS = ["--model.n_layer", "2", "--model.n_embd", "128", "--model.n_head", "4"]
COORDINATOR_PORT = 29400
MARKER = "cluster-table"


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares."""

    workers: int
    steps: int
    eval_every: int
    target_step: int
    headline_mbit: float
    calibration_steps: int
    max_run_s: float
    small: bool
    seed: int = 0
    per_node: int = 1  # processes per node: a node is one network namespace, its processes on its loopback

    @property
    def processes(self) -> int:
        return self.workers * self.per_node


@dataclass(frozen=True)
class Run:
    """One training run: a method on links capped at ``rate_mbit`` (None: uncapped)."""

    method: str
    rate_mbit: float | None
    elastic: bool = False
    stop_at: int | None = None
    inner: str = "auto"  # who a worker is, with several processes per node (--inner)

    @property
    def label(self) -> str:
        if self.elastic:
            return f"{self.method} (elastic)"
        return self.method if self.inner == "auto" else f"{self.method} (inner {self.inner})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model, 4 methods, the headline rate only")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rates", help="comma-separated Mbit/s; the first is the headline (default 20,10,100; --small: 20)")
    parser.add_argument("--methods", help="comma-separated methods at the headline rate (default: all baselines and modes)")
    parser.add_argument("--steps", type=int, help="training steps (default 150; --small: 40)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 15; --small: 10)")
    parser.add_argument("--target-step", type=int, help="the target is the uncapped DDP loss at this step (default: steps/2)")
    parser.add_argument("--max-run-s", type=float, default=300.0, help="DDP runs expected to take longer stop early (extrapolated)")
    parser.add_argument("--no-elastic", action="store_true", help="skip the elastic (coordinator) row")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up on one run after this long")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "cluster.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only redraw plots and the table from --out")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    steps = args.steps or (40 if args.small else 150)
    eval_every = args.eval_every or (10 if args.small else 15)
    target_step = args.target_step or max(eval_every, (steps // 2) // eval_every * eval_every)
    if target_step % eval_every or not 0 < target_step <= steps:
        raise ValueError(f"--target-step {target_step} must be a multiple of --eval-every {eval_every} within the {steps} steps")
    return Settings(
        workers=args.workers, steps=steps, eval_every=eval_every, target_step=target_step,
        headline_mbit=rates_from(args)[0], calibration_steps=min(steps, 2 * eval_every),
        max_run_s=args.max_run_s, small=args.small,
    )


def rates_from(args: argparse.Namespace) -> list[float]:
    text = args.rates or ("20" if args.small else "20,10,100")
    rates = [float(rate) for rate in text.split(",")]
    if any(rate <= 0 for rate in rates):
        raise ValueError(f"rates must be positive Mbit/s, got {text}")
    return rates


def plan_runs(args: argparse.Namespace, settings: Settings) -> list[Run]:
    """The compute-bound limit first, then every method at the headline rate, then the other rates."""
    headline, *others = rates_from(args)
    default_methods = SMALL_METHODS if args.small else HEADLINE_METHODS
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(default_methods)
    for name in methods:
        get_method(name)
    runs = [Run(LIMIT, None)]
    runs += [Run(name, None, stop_at=settings.calibration_steps) for name in methods if name != LIMIT]
    runs += [Run(name, headline) for name in methods]
    if not args.no_elastic:
        runs.append(Run(DEFAULT_METHOD, headline, elastic=True))
    runs += [Run(name, rate) for rate in others for name in OTHER_RATE_METHODS]
    return runs


def ring_seconds_per_step(dense_bytes: int, workers: int, rate_mbit: float) -> float:
    """How long a ring all-reduce of ``dense_bytes`` takes on one worker's capped uplink."""
    return 2 * (workers - 1) / workers * dense_bytes * 8 / (rate_mbit * 1e6)


def early_stop(run: Run, settings: Settings, limit: dict[str, Any]) -> Run:
    """DDP on a slow link can take hours; stop it once its step time is measured.

    Its loss curve is the uncapped DDP run's, bit for bit (the same sums in the same order), so
    time to target = the limit's steps to target x the measured step time.
    """
    if run.method != LIMIT or run.rate_mbit is None or "step_s" not in limit:
        return run
    expected = limit["step_s"] + ring_seconds_per_step(limit["dense_bytes_per_step"], settings.processes, run.rate_mbit)
    affordable = int(settings.max_run_s / expected) // settings.eval_every * settings.eval_every
    return run if affordable >= settings.steps else Run(run.method, run.rate_mbit, stop_at=max(settings.eval_every, affordable))


def worker_flags(run: Run, settings: Settings, summary_file: Path) -> list[str]:
    """Flags for ``python -m disttrain.launcher``."""
    flags = [
        "--method", run.method,
        "--steps", str(settings.steps),
        "--eval_every", str(settings.eval_every),
        "--seed", str(settings.seed),
        "--summary-file", str(summary_file),
    ]
    if run.stop_at is not None:
        flags += ["--stop_at", str(run.stop_at)]
    if run.elastic:
        flags += ["--coordinator", f"tcp://{HUB_ADDRESS}:{COORDINATOR_PORT}", "--job", "cluster"]
    if run.inner != "auto":
        flags += ["--inner", run.inner]
    return flags + (SMALL_MODEL_FLAGS if settings.small else [])


def coordinator_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "disttrain.cli", "coordinator", "--bind", f"tcp://{HUB_ADDRESS}:{COORDINATOR_PORT}",
        "--job", "cluster", "--start-workers", str(settings.workers), "--min-workers", str(settings.workers),
    ]


def worker_environment(rank: int, lab: NetLab, settings: Settings, secret: str) -> dict[str, str]:
    """torchrun's variables, pointing at rank 0's namespace, with Gloo on the lab's interface."""
    env = worker_env(rank, settings.processes, COORDINATOR_PORT + 10, per_node=settings.per_node)
    env.update(MASTER_ADDR=lab.address(0), GLOO_SOCKET_IFNAME=HOST_INTERFACE, PYTHONUNBUFFERED="1")
    env[SECRET_ENV] = secret
    return env


def start_processes(run: Run, lab: NetLab, settings: Settings, summary_file: Path, log_handle) -> list[subprocess.Popen]:
    """The coordinator (elastic runs) in the hub, then every node's processes in its host namespace."""
    secret = secrets.token_hex(32)
    procs = []
    if run.elastic:
        env = {**os.environ, SECRET_ENV: secret}
        command = lab.in_namespace(lab.hub, coordinator_command(settings))
        procs.append(subprocess.Popen(command, env=env, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True))
    for rank in range(settings.processes):
        command = lab.in_namespace(lab.host(rank // settings.per_node), [sys.executable, "-m", "disttrain.launcher", *worker_flags(run, settings, summary_file)])
        procs.append(subprocess.Popen(
            command, env=worker_environment(rank, lab, settings, secret), stdout=log_handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))
    return procs


def stop_processes(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def execute(run: Run, settings: Settings, logs_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Build the lab, train, read the counters, tear the lab down; the run's record."""
    rate = "uncapped" if run.rate_mbit is None else f"{run.rate_mbit:g}mbit"
    stem = f"{run.label.replace(' ', '').replace('(', '-').replace(')', '')}-{rate}"
    summary_file, log_file = logs_dir / f"{stem}.summary.json", logs_dir / f"{stem}.log"
    summary_file.unlink(missing_ok=True)
    lab = NetLab(settings.workers, run.rate_mbit, prefix=f"dtb{os.getpid()}")
    record: dict[str, Any] = {**asdict(run), "label": run.label, "log": os.path.relpath(log_file, common.REPO_ROOT)}
    procs: list[subprocess.Popen] = []
    lab.setup()
    try:
        before = [lab.tx_bytes(i) for i in range(settings.workers)]
        with open(log_file, "w") as handle:
            procs = start_processes(run, lab, settings, summary_file, handle)
            code = wait_for_workers(procs[1:] if run.elastic else procs, timeout_s)
        sent = [lab.tx_bytes(i) - start for i, start in enumerate(before)]
    finally:
        stop_processes(procs)
        lab.teardown()
    if summary_file.is_file():
        record.update(summary_fields(json.loads(summary_file.read_text()), sent))
    if code != 0 or not summary_file.is_file():
        reason = "timed out" if code == TIMED_OUT else "replicas differed" if code == 1 and summary_file.is_file() else "workers failed"
        record["error"] = f"{reason} (exit code {code}); see {log_file}"
    return record


class Runner:
    """Executes runs in the lab, one at a time, keeping every record and a progress bar."""

    def __init__(self, logs_dir: Path, timeout_s: float, total: int):
        self.logs_dir, self.timeout_s = logs_dir, timeout_s
        self.bar = tqdm(total=total, desc="runs", unit="run")
        self.records: list[dict[str, Any]] = []

    def __call__(self, run: Run, settings: Settings, **labels: Any) -> dict[str, Any]:
        rate = "uncapped" if run.rate_mbit is None else f"{run.rate_mbit:.3g} Mbit/s"
        layout = f"x{settings.workers}" + (f"x{settings.per_node}" if settings.per_node > 1 else "")
        self.bar.set_postfix_str(f"{run.label} {layout} @ {rate}")
        logs_dir = self.logs_dir / f"{'small-' if settings.small else ''}{layout}"
        logs_dir.mkdir(parents=True, exist_ok=True)
        record = {
            **execute(run, settings, logs_dir, self.timeout_s),
            "workers": settings.workers, "per_node": settings.per_node, "small": settings.small, **labels,
        }
        if "history" not in record:
            raise RuntimeError(f"{run.method} at {rate} failed: {record.get('error')}")
        log.info("%s %s @ %s: val loss %.4f after %d steps, %.3f s/step", run.label, layout, rate,
                 record["final_val_loss"], record["steps_run"], record["step_s"])
        self.records.append(record)
        self.bar.update()
        return record


def summary_fields(summary: dict[str, Any], tx_bytes: list[int]) -> dict[str, Any]:
    """The record fields taken from rank 0's summary and the interface counters."""
    steps = summary["steps"]
    return {
        "steps_run": steps,
        "history": summary["history"],
        "final_val_loss": summary["history"][-1]["val_loss"] if summary["history"] else summary["val_loss"],
        "wall_s": summary["wall_s"],
        "step_s": summary["wall_s"] / steps,
        "payload_bytes_per_step": summary["bytes_per_step"],
        "counted_wire_bytes_per_step": summary["wire_bytes_per_step"],
        "dense_bytes_per_step": summary["dense_bytes_per_step"],
        "wire_bytes_per_step": sum(tx_bytes) / len(tx_bytes) / steps,
        "replicas_identical": summary["replicas_identical"],
        "held_bytes": summary.get("held_bytes", {}),
        "peak_rss_bytes": summary.get("peak_rss_bytes"),
    }


def interpolate_crossing(history: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (wall_s, total_bytes or step) where the val loss first reaches ``target``,
    linearly interpolated between the two evaluations around the crossing."""
    previous = None
    for point in history:
        if point["val_loss"] <= target:
            if previous is None:
                return float(point[key])
            fraction = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous[key] + fraction * (point[key] - previous[key])
        previous = point
    return None


def derive(records: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Target, time to target, speed-ups and comm shares, computed from the records."""
    limit = next(r for r in records if r["method"] == LIMIT and r["rate_mbit"] is None)
    target = next(p["val_loss"] for p in limit["history"] if p["step"] == settings.target_step)
    limit_steps = interpolate_crossing(limit["history"], target, "step")
    limit_time = interpolate_crossing(limit["history"], target, "wall_s")
    uncapped = {r["method"]: r["step_s"] for r in records if r["rate_mbit"] is None and "step_s" in r}
    for record in records:
        if "history" not in record:
            continue
        time_to_target = interpolate_crossing(record["history"], target, "wall_s")
        record["extrapolated"] = time_to_target is None and record["method"] == LIMIT and record["stop_at"] is not None
        if record["extrapolated"]:
            time_to_target = limit_steps * record["step_s"]
        record["time_to_target_s"] = time_to_target
        record["bytes_to_target"] = interpolate_crossing(record["history"], target, "total_bytes")
        record["x_limit"] = None if time_to_target is None else time_to_target / limit_time
        base = uncapped.get(record["method"])
        record["comm_share"] = None if base is None or record["rate_mbit"] is None else max(0.0, 1 - base / record["step_s"])
    for record in records:
        ddp = next((r for r in records if r["method"] == LIMIT and r["rate_mbit"] == record["rate_mbit"]), None)
        theirs, ours = (ddp or {}).get("time_to_target_s"), record.get("time_to_target_s")
        record["x_faster_than_ddp"] = None if not theirs or not ours else theirs / ours
    return {"target_val_loss": target, "limit_time_to_target_s": limit_time, "targets": target_checks(records, settings)}


def target_checks(records: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The issue's targets at the headline rate, for the best disttrain method."""
    at_rate = [r for r in records if r["rate_mbit"] == settings.headline_mbit and r.get("time_to_target_s")]
    ours = [r for r in at_rate if get_method(r["method"]).compresses and not get_method(r["method"]).traits.torch_ddp]
    powersgd = [r for r in at_rate if r["method"].startswith("powersgd")]
    if not ours:
        return {"best": None}
    best = min(ours, key=lambda r: r["time_to_target_s"])
    best_powersgd = min(powersgd, key=lambda r: r["time_to_target_s"]) if powersgd else None
    return {
        "best": best["label"],
        "x_limit": best["x_limit"],
        "x_faster_than_ddp": best["x_faster_than_ddp"],
        "best_powersgd": best_powersgd["label"] if best_powersgd else None,
        "x_faster_than_best_powersgd": best_powersgd["time_to_target_s"] / best["time_to_target_s"] if best_powersgd else None,
        "lower_loss_than_powersgd_r4_at_equal_bytes": lower_at_equal_bytes(best, records, settings),
    }


EQUAL_BYTES_VERDICT = {True: "yes", False: "no", None: "not comparable, no logged byte count reached by both runs"}


def lower_at_equal_bytes(ours: dict[str, Any], records: list[dict[str, Any]], settings: Settings) -> bool | None:
    """Whether ``ours`` has a lower loss than powersgd-r4 at every byte count both runs reached."""
    theirs = next((r for r in records if r["method"] == "powersgd-r4" and r["rate_mbit"] == settings.headline_mbit and "history" in r), None)
    if theirs is None:
        return None
    checks = []
    for point in theirs["history"]:
        mine = [p for p in ours["history"] if p["total_bytes"] <= point["total_bytes"]]
        if mine and point["total_bytes"] <= ours["history"][-1]["total_bytes"]:
            checks.append(mine[-1]["val_loss"] < point["val_loss"])
    return all(checks) if checks else None


def run_all(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    logs_dir = args.out.parent / "logs" / "cluster"
    logs_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    records: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        for run in (bar := tqdm(plan_runs(args, settings), desc="runs", unit="run")):
            limit = records[0] if records else {}
            run = early_stop(run, settings, limit)
            bar.set_postfix_str(f"{run.label} @ {'uncapped' if run.rate_mbit is None else f'{run.rate_mbit:g} Mbit/s'}")
            records.append(execute(run, settings, logs_dir, args.timeout_s))
            log.info("%s: %s", bar.postfix, outcome(records[-1]))
    if "history" not in records[0]:
        raise RuntimeError(f"the compute-bound limit run failed ({records[0].get('error')}): no target, nothing to compare")
    return {
        "machine": common.machine_description(),
        "settings": asdict(settings),
        "command": command,
        **derive(records, settings),
        "runs": records,
    }


def outcome(record: dict[str, Any]) -> str:
    if "history" not in record:
        return f"FAILED: {record['error']}"
    text = f"val loss {record['final_val_loss']:.4f} after {record['steps_run']} steps, {record['step_s']:.2f} s/step"
    return f"{text}; ERROR: {record['error']}" if "error" in record else text


def rate_label(rate: float | None) -> str:
    return "uncapped" if rate is None else f"{rate:g} Mbit/s"


def caption(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (
        f"{s['workers']} workers, one per network namespace, links capped with tc tbf both ways; Gloo; "
        f"{common.machine_line(results['machine'])}; {s['steps']} steps{' (small model)' if s['small'] else ''}, seed {s['seed']}"
    )


def plot(results: dict[str, Any], x_key: str, x_name: str, path: Path, log_x: bool) -> None:
    """Val loss against ``x_key``, one line per method at the headline rate, plus the uncapped limit."""
    settings = results["settings"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for record in results["runs"]:
        shown = record["rate_mbit"] == settings["headline_mbit"] or (record["method"] == LIMIT and record["rate_mbit"] is None)
        if shown and record.get("history"):
            label = f"{record['label']} ({rate_label(record['rate_mbit'])})"
            style = ":" if record["rate_mbit"] is None else "--" if record["method"].startswith(("ddp", "powersgd")) else "-"
            xs = [max(point[x_key], 1) for point in record["history"]] if log_x else [point[x_key] for point in record["history"]]
            ax.plot(xs, [point["val_loss"] for point in record["history"]], style, marker="o", markersize=3, label=label)
    ax.axhline(results["target_val_loss"], color="grey", linestyle=":", linewidth=1, label="target")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x_name} (log scale)" if log_x else x_name)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"{rate_label(settings['headline_mbit'])} links: validation loss vs {x_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="dashed: torch baselines", title_fontsize=7)
    fig.text(0.5, 0.01, caption(results), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(results: dict[str, Any], out_dir: Path) -> None:
    plot(results, "wall_s", "wall-clock seconds", out_dir / "cluster_loss_vs_time.png", log_x=False)
    plot(results, "total_bytes", "cumulative payload bytes per worker", out_dir / "cluster_loss_vs_bytes.png", log_x=True)


def _number(value: float | None, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def table_row(record: dict[str, Any]) -> list[str]:
    if "history" not in record:
        return [record["label"], rate_label(record["rate_mbit"]), "failed"] + ["—"] * 6
    time_text = _number(record["time_to_target_s"], ".0f", "not reached")
    if record["extrapolated"]:
        time_text = f"{time_text}*"
    name = f"{record['label']} (error)" if "error" in record else record["label"]
    return [
        name,
        rate_label(record["rate_mbit"]),
        time_text,
        _number(record["x_limit"], ".2f"),
        _number(record["x_faster_than_ddp"], ".1f"),
        common.human_bytes(record["payload_bytes_per_step"]),
        common.human_bytes(record["wire_bytes_per_step"]),
        _number(None if record["comm_share"] is None else 100 * record["comm_share"], ".0f"),
        f"{record['final_val_loss']:.3f} @ {record['steps_run']}",
    ]


def render_table(results: dict[str, Any], results_file: Path = common.RESULTS_DIR / "cluster.json") -> str:
    s, t = results["settings"], results["targets"]
    headers = [
        "method", "link", "time to target (s)", "x the limit", "x faster than DDP", "payload/step",
        "wire/step (tx_bytes)", "comm % of step", "val loss @ step",
    ]
    shown = [r for r in results["runs"] if r["rate_mbit"] is not None or r["method"] == LIMIT]
    table = common.markdown_table(headers, [table_row(r) for r in shown])
    best = "no disttrain method reached the target" if t["best"] is None else (
        f"best disttrain method at {rate_label(s['headline_mbit'])}: **{t['best']}**, "
        f"{_number(t['x_limit'], '.2f')}x the compute-bound limit's time (target <= 1.2), "
        f"{_number(t['x_faster_than_ddp'], '.1f')}x faster than DDP (target >= 10), "
        f"{_number(t['x_faster_than_best_powersgd'], '.1f')}x faster than the best PowerSGD, {t['best_powersgd']} (target >= 2); "
        f"lower loss than powersgd-r4 at equal bytes at every logged point: {EQUAL_BYTES_VERDICT[t['lower_loss_than_powersgd_r4_at_equal_bytes']]}"
    )
    return (
        f"{table}\n\n"
        f"Target: val loss {results['target_val_loss']:.4f}, the uncapped DDP run's loss at step {s['target_step']} "
        f"(reached in {results['limit_time_to_target_s']:.0f} s: the compute-bound limit). {best}. "
        f"Measured on {common.machine_line(results['machine'])}: {s['workers']} workers, one per network namespace, "
        f"each link capped with tc tbf in both directions; {s['steps']} steps, eval every {s['eval_every']}. "
        "Payload = bytes the library put into collectives per worker per step; wire = the worker's interface "
        "tx_bytes over the whole run (start-up broadcast, evaluation and TCP/IP headers included) per step. "
        "Comm % = 1 - (the method's uncapped step time, measured over "
        f"{s['calibration_steps']} steps) / (its step time on the capped link). "
        "\\* DDP on slow links stops early: its loss curve equals the uncapped run's bit for bit, so its time to "
        "target is the uncapped run's steps to target x its measured step time. torch's powerSGD_hook runs with one "
        f"DDP bucket (bucket_cap_mb=1024). {common.generated_by(results['command'], results_file)}"
    )


def render(results: dict[str, Any], document: Path, out: Path) -> bool:
    """Plots next to the results file ``out`` and the table in ``document``; False if it lacks the markers."""
    plot_all(results, out.parent)
    return common.publish_table(render_table(results, out), MARKER, document, out.parent)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    if not args.render_only and not ready_for("cluster benchmark"):
        return 0
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args, settings_from(args)))
    if results is None:
        return 2
    return 0 if render(results, args.doc, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Join time against the size of the state: how long a new worker takes to its first committed step.

For each model, a coordinator and 2 workers train the default method (diloco-sparse-k4-h5) on
this machine; then new workers join one at a time. From the joiner's and the donor's own log
stamps, each join is split into its phases:

- start: the process started (Python, torch, the model) until it asks the coordinator;
- admission: asking until it enters a generation (the coordinator's join grace, the members
  reaching their next round start, the process group forming);
- setup: entering until the transfer starts (the joiner builds its exchange; the members'
  step and digest all-gather);
- transfer: the donor serialising its replica state and broadcasting it to the joiner;
- load: deserialising and loading that state;
- first step: the state loaded until its first committed step (a round's local steps, then the
  round's exchange).

    python benchmarks/join_time.py                 # about 5 minutes on 2 cores
    python benchmarks/join_time.py --render-only   # the table in docs/benchmarks.md from the JSON
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from disttrain.launcher.elastic_job import ElasticJob
from disttrain.methods import DEFAULT_METHOD
from disttrain.models.gpt import GPT, GPTConfig

sys.path.append(str(Path(__file__).resolve().parent))
import common  # noqa: E402
from chaos import JOIN_REQUEST, log_stamp, first_steps_after, wait_until  # noqa: E402

log = logging.getLogger("benchmarks.join_time")

MODELS = {  # name: (n_layer, n_embd); the default GPT first
    "default GPT (4 x 256)": (4, 256),
    "GPT 6 x 384": (6, 384),
    "GPT 8 x 512": (8, 512),
}
ENTERED = re.compile(rb"^(\S+) .*entered generation \d+ as rank", re.MULTILINE)
RECEIVED = re.compile(rb"^(\S+) .*state of step \d+ received from rank \d+: ([\d.]+) MB in ([\d.]+) s .*loaded in ([\d.]+) s", re.MULTILINE)
SENT = re.compile(rb"^(\S+) .*state from rank \d+ at step \d+ sent to ranks .*: ([\d.]+) MB, serialised in ([\d.]+) s, sent in ([\d.]+) s", re.MULTILINE)
PHASES = ("start", "admission", "setup", "transfer", "load", "first_step", "total")


def model_flags(layers: int, width: int) -> list[str]:
    return [
        "--model.n-layer", str(layers), "--model.n-embd", str(width), "--model.n-head", "4",
        "--data.batch-size", "8", "--data.val-batches", "2", "--method", DEFAULT_METHOD,
    ]


def parameters(layers: int, width: int) -> int:
    return sum(p.numel() for p in GPT(GPTConfig(n_layer=layers, n_embd=width, n_head=4)).parameters())


def join_phases(job: ElasticJob, joiner: int, started_at: float) -> dict | None:
    """The phases of one join, in seconds, from the joiner's and the donors' logs (None: it did not join)."""
    text = job.log(joiner)
    firsts = first_steps_after(text, started_at)
    received, entered, request = RECEIVED.search(text), ENTERED.search(text), JOIN_REQUEST.search(text)
    if not (firsts and received and entered and request):
        return None
    t_request, t_entered = log_stamp(request.group(1)), log_stamp(entered.group(1))
    t_received = log_stamp(received.group(1))
    transfer_s, load_s = float(received.group(3)), float(received.group(4))
    sent = sorted(
        (log_stamp(m.group(1)), float(m.group(3)), float(m.group(4)))
        for i in range(joiner) for m in SENT.finditer(job.log(i)) if log_stamp(m.group(1)) >= started_at
    )
    phases = {
        "start": t_request - started_at,
        "admission": t_entered - t_request,
        "setup": t_received - load_s - transfer_s - t_entered,
        "transfer": transfer_s,
        "load": load_s,
        "first_step": firsts[0][0] - t_received,
        "total": firsts[0][0] - t_request,
        "state_mb": float(received.group(2)),
    }
    if sent:
        phases["donor_serialise_s"], phases["donor_send_s"] = sent[0][1], sent[0][2]
    return phases


def measure(name: str, layers: int, width: int, joins: int, workdir: Path) -> dict:
    job = ElasticJob(workdir, model_flags(layers, width), steps=10**6, link_mbit=20.0, heartbeat_timeout_s=3.0)
    try:
        job.start_coordinator(start_workers=2)
        for _ in range(2):
            job.start_worker()
        job.wait_for_step(0, 10, timeout_s=600)
        runs = []
        for _ in range(joins):
            started_at = time.time()
            joiner = len(job.workers)
            job.start_worker()
            if not wait_until(lambda: bool(first_steps_after(job.log(joiner), started_at)), 300):
                raise RuntimeError(f"worker {joiner} did not join within 300 s:\n{job.log(joiner).decode()[-2000:]}")
            time.sleep(1.0)  # the donors' log lines
            phases = join_phases(job, joiner, started_at)
            log.info("%s, join %d: %s", name, len(runs) + 1, phases)
            runs.append(phases)
            time.sleep(3.0)
        step_s = _step_time(job)
    finally:
        job.close()
    return {
        "model": name, "n_layer": layers, "n_embd": width, "parameters": parameters(layers, width),
        "step_s": step_s, "joins": runs,
        "median": {phase: round(statistics.median(r[phase] for r in runs), 2) for phase in (*PHASES, "state_mb")},
    }


def _step_time(job: ElasticJob) -> float | None:
    """Seconds per step of worker 0 between its first and last logged evaluations (joins included)."""
    points = [(log_stamp(m.group(1)), int(m.group(2))) for m in re.finditer(rb"^(\S+) .*step (\d+): val loss", job.log(0), re.MULTILINE)]
    if len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    return round((t1 - t0) / (s1 - s0), 3) if s1 > s0 else None


def render_table(result: dict, results_file: Path) -> str:
    rows = []
    for run in result["models"]:
        m = run["median"]
        rows.append([
            run["model"], f"{run['parameters'] / 1e6:.1f} M", f"{m['state_mb']:.0f} MB", f"{run['step_s']} s" if run["step_s"] else "-",
            *(f"{m[phase]:.2f} s" for phase in PHASES),
        ])
    headers = [
        "model", "parameters", "state sent", "seconds per step over the run", "start (process to request)", "admission (request to generation)",
        "setup", "transfer", "load", "to the first step", "request to first step",
    ]
    note = (
        f"\n\nMedians of {result['joins']} joins per model, each into a running job of 2 or more workers on this machine "
        f"(the state goes over loopback). Measured on {common.machine_line(result['machine'])}: {result['method_note']} "
        f"{common.generated_by(result['command'], results_file)}"
    )
    return common.markdown_table(headers, rows) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joins", type=int, default=3, help="joins per model")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "join_time.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    args = parser.parse_args(argv)
    common.setup_logging()

    def run() -> dict:
        models = []
        for name, (layers, width) in MODELS.items():
            with tempfile.TemporaryDirectory(prefix="disttrain-join-") as workdir:
                models.append(measure(name, layers, width, args.joins, Path(workdir)))
        return {
            "machine": common.machine_description(),
            "method_note": (
                f"{DEFAULT_METHOD} (5 local steps a round, so a joiner is admitted at a round start), AdamW, "
                "batch 8 x 128 tokens, uplinks paced to 20 Mbit/s for the exchange (the state transfer is not paced), "
                "join grace 0.5 s; times from the processes' own log stamps."
            ),
            "command": "python benchmarks/join_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "joins": args.joins,
            "models": models,
        }

    result = common.run_or_reread(args.render_only, args.out, run)
    if result is None:
        return 2
    return 0 if common.publish_table(render_table(result, args.out), "join-time-table", args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Chaos benchmark: a real elastic job on this machine, disturbed by random kill -9 and join events.

For each event it measures, from the workers' own timestamped logs:
- kill: time from the kill to the moment every survivor committed its first step in the new
  generation, and whether any committed step was lost (the first step after the regroup
  must follow the last one committed before it);
- join: time from the joiner asking the coordinator to join to its first committed step.
Over the whole run it counts survivor restarts (processes that ended without being killed)
and replica mismatches found by the digest check (every 10 steps), and at the end compares
the final parameter digests of all workers.

    python benchmarks/chaos.py                 # 50 events, about 6 minutes on 2 cores
    python benchmarks/chaos.py --events 10
    python benchmarks/chaos.py --render-only   # the table in docs/benchmarks.md from the existing JSON
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from disttrain.launcher.elastic_job import ElasticJob

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

log = logging.getLogger("benchmarks.chaos")

MODEL_FLAGS = [
    "--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2", "--model.block_size", "32",
    "--data.block_size", "32", "--data.batch_size", "4", "--data.val_batches", "2", "--rank", "4",
]
JOIN_REQUEST = re.compile(rb"^(\S+ \S+) .*asking the coordinator at", re.MULTILINE)
FIRST_STEP = re.compile(rb"^(\S+ \S+) .*first step of generation (\d+) committed \(step (\d+)\)", re.MULTILINE)
FAILED_STEP = re.compile(rb"^(\S+ \S+) .*step (\d+) failed", re.MULTILINE)
MISMATCH = re.compile(rb"replica check at step")
DIGEST_LINE = re.compile(rb"replicas identical at step (\d+) \(digest ([0-9a-f]{16})\)")
HEARTBEAT_TIMEOUT_S = 2.0


@dataclass
class Event:
    kind: str  # "kill" or "join"
    at: float  # wall-clock seconds (time.time())
    worker: int
    recovery_s: float | None = None
    steps_lost: int | None = None


def _stamp(raw: bytes) -> float:
    return datetime.strptime(raw.decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_steps_after(text: bytes, after: float) -> list[tuple[float, int]]:
    """(time, committed step) of each 'first step of generation' line logged after ``after``."""
    found = []
    for match in FIRST_STEP.finditer(text):
        when = _stamp(match.group(1))
        if when >= after:
            found.append((when, int(match.group(3))))
    return found


def failed_steps_after(text: bytes, after: float) -> list[int]:
    return [int(m.group(2)) for m in FAILED_STEP.finditer(text) if _stamp(m.group(1)) >= after]


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class Chaos:
    def __init__(self, job: ElasticJob, rng: random.Random, min_alive: int, max_alive: int):
        self.job = job
        self.rng = rng
        self.min_alive = min_alive
        self.max_alive = max_alive
        self.killed: set[int] = set()
        self.events: list[Event] = []

    def alive(self) -> list[int]:
        return [i for i, proc in enumerate(self.job.workers) if proc.poll() is None]

    def kill(self) -> Event:
        victim = self.rng.choice(self.alive())
        event = Event("kill", time.time(), victim)
        self.job.signal(victim, signal.SIGKILL)
        self.killed.add(victim)
        survivors = [i for i in self.alive() if i != victim]  # the victim may not be reaped yet

        def recovered() -> bool:
            return all(first_steps_after(self.job.log(i), event.at) for i in survivors)

        if wait_until(recovered, 60):
            firsts = [first_steps_after(self.job.log(i), event.at)[0] for i in survivors]
            event.recovery_s = max(when for when, _ in firsts) - event.at
            failed = [s for i in survivors for s in failed_steps_after(self.job.log(i), event.at)]
            resumed = min(step for _, step in firsts)
            event.steps_lost = max(0, (min(failed) + 1 - resumed) if failed else 0)
        return event

    def join(self) -> Event:
        event = Event("join", time.time(), len(self.job.workers))
        self.job.start_worker()

        def joined() -> bool:
            return bool(first_steps_after(self.job.log(event.worker), event.at))

        if wait_until(joined, 90):
            asked = _join_request_time(self.job.log(event.worker)) or event.at
            event.recovery_s = first_steps_after(self.job.log(event.worker), event.at)[0][0] - asked
            event.steps_lost = 0
        return event

    def step(self) -> Event:
        alive = len(self.alive())
        if alive <= self.min_alive:
            kind = "join"
        elif alive >= self.max_alive:
            kind = "kill"
        else:
            kind = self.rng.choice(["kill", "join"])
        event = self.kill() if kind == "kill" else self.join()
        self.events.append(event)
        return event


def _join_request_time(text: bytes) -> float | None:
    """When the worker asked the coordinator to join (after its imports)."""
    match = JOIN_REQUEST.search(text)
    return _stamp(match.group(1)) if match else None


def summarise(chaos: Chaos, final_digests: list[str]) -> dict:
    kills = [e for e in chaos.events if e.kind == "kill"]
    joins = [e for e in chaos.events if e.kind == "join"]

    def stats(values: list[float | None]) -> dict:
        measured = [v for v in values if v is not None]
        return {
            "median_s": round(statistics.median(measured), 2) if measured else None,
            "max_s": round(max(measured), 2) if measured else None,
            "unmeasured": len(values) - len(measured),
        }

    restarts = [i for i, proc in enumerate(chaos.job.workers) if proc.poll() is not None and i not in chaos.killed]
    mismatches = sum(len(MISMATCH.findall(chaos.job.log(i))) for i in range(len(chaos.job.workers)))
    return {
        "events": len(chaos.events),
        "kills": len(kills),
        "joins": len(joins),
        "survivor_restarts": len(restarts),
        "committed_steps_lost": sum(e.steps_lost or 0 for e in kills),
        "kill_to_next_step": stats([e.recovery_s for e in kills]),
        "join_to_first_step": stats([e.recovery_s for e in joins]),
        "replica_mismatches_found": mismatches,
        "final_digests_identical": len(set(final_digests)) == 1,
        "workers_at_end": len(final_digests),
    }


def render_table(result: dict, results_file: Path = common.RESULTS_DIR / "chaos.json") -> str:
    s = result["summary"]
    rows = [
        ["events (kill -9 / join)", f"{s['events']} ({s['kills']} / {s['joins']})", "≥ 50"],
        ["survivor restarts", str(s["survivor_restarts"]), "0"],
        ["committed steps lost", str(s["committed_steps_lost"]), "0"],
        ["kill → survivors' next step, median / max", f"{s['kill_to_next_step']['median_s']} s / {s['kill_to_next_step']['max_s']} s", f"≤ heartbeat timeout + 2 s = {HEARTBEAT_TIMEOUT_S + 2:.0f} s"],
        ["join → joiner's first step, median / max", f"{s['join_to_first_step']['median_s']} s / {s['join_to_first_step']['max_s']} s", "≤ 5 s"],
        ["replica mismatches found by the digest check", str(s["replica_mismatches_found"]), "0"],
        ["final parameters identical on all workers", str(s["final_digests_identical"]), "True"],
    ]
    note = (
        f"\n\nMeasured on {common.machine_line(result['machine'])}: {result['method_note']} "
        f"{common.generated_by(result['command'], results_file)}"
    )
    return common.markdown_table(["measure", "result", "target"], rows) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4, help="workers at the start")
    parser.add_argument("--min-alive", type=int, default=2)
    parser.add_argument("--max-alive", type=int, default=5)
    parser.add_argument("--pause-s", type=float, default=2.0, help="mean quiet time between events")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "chaos.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    args = parser.parse_args(argv)
    common.setup_logging()
    if args.render_only:
        result = common.read_results(args.out)
        if result is None:
            return 2
        return 0 if common.publish_table(render_table(result, args.out), "chaos-table", args.doc, args.out.parent) else 1
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="disttrain-chaos-") as workdir:
        job = ElasticJob(Path(workdir), MODEL_FLAGS, steps=10**6, link_mbit=2.0, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        chaos = Chaos(job, rng, args.min_alive, args.max_alive)
        try:
            job.start_coordinator(start_workers=args.workers)
            for _ in range(args.workers):
                job.start_worker()
            job.wait_for_step(0, 10)
            for _ in tqdm(range(args.events), desc="events"):
                time.sleep(rng.uniform(0.5, 1.5) * args.pause_s)
                event = chaos.step()
                log.info("%s of worker %d: %s s", event.kind, event.worker, event.recovery_s)
            summary = summarise(chaos, _final_digests(job, chaos.alive()))
        finally:
            job.close()
    result = {
        "machine": common.machine_description(),
        "method_note": (
            f"{args.workers} workers at the start, between {args.min_alive} and {args.max_alive} alive, a 2-layer "
            "byte-level GPT, uplinks paced to 2 Mbit/s, heartbeat every 0.25 s, heartbeat timeout "
            f"{HEARTBEAT_TIMEOUT_S:.0f} s, membership check every 5 steps; times from the workers' own log stamps."
        ),
        "command": "python benchmarks/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": summary,
        "events": [asdict(e) for e in chaos.events],
    }
    common.save_results(args.out, result)
    common.publish_table(render_table(result, args.out), "chaos-table", args.doc, args.out.parent)
    log.info("summary: %s", result["summary"])
    return 0


def _final_digests(job: ElasticJob, alive: list[int]) -> list[str]:
    """Each live worker's parameter digest at the last replica check they all logged."""
    logged = [dict((int(step), digest.decode()) for step, digest in DIGEST_LINE.findall(job.log(i))) for i in alive]
    common_steps = set.intersection(*(set(entries) for entries in logged)) if logged else set()
    if not common_steps:
        return []
    last = max(common_steps)
    return [entries[last] for entries in logged]


if __name__ == "__main__":
    sys.exit(main())

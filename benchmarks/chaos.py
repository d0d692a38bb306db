"""Chaos benchmark: a real elastic job on this machine, disturbed by random faults and joins.

Event kinds:
- kill: kill -9 of one worker;
- combined: kill -9 of the coordinator and of one worker at the same moment, the coordinator
  restarted on the same ports 2 s later;
- coordinator: kill -9 of the coordinator alone, restarted 2 s later;
- forming: kill -9 of one worker, then of the coordinator 0.3 s later while the survivors form
  the next generation, the coordinator restarted 2 s after that;
- stop: SIGSTOP of one worker for the heartbeat timeout + 1 s, then SIGCONT (it is evicted and
  joins again with fresh state, in the same process);
- partition: one worker's link taken down for the heartbeat timeout + 1 s, then up again (it is
  evicted and joins again, in the same process);
- join: a new worker.

The job runs in network namespaces (netlab.py, one per worker, the coordinator on the hub), so a
partition is a real link going down; ``--no-lab`` runs it on this machine's loopback instead,
without partitions (the lab needs root).

For each event it measures, from the workers' own timestamped logs, the time from the fault to
the survivors' next committed step (for a membership change: every survivor's first step in the
new generation; for a coordinator restart alone: every live worker's next logged step), whether a
committed step was lost (the first step after a regroup must follow the last one committed before
it), and whether the job hung (no committed step within the heartbeat timeout + 15 s); for a join,
the time from the joiner asking the coordinator to its first committed step; for a stop or a
partition, also the time from the worker's return to its first committed step as a member again. Over the whole run it
counts survivor restarts (processes that ended without being killed) and replica mismatches found
by the digest check (every 10 steps), and at the end compares the final parameter digests.

    python benchmarks/chaos.py                 # 100 events, about 15 minutes on 2 cores
    python benchmarks/chaos.py --events 20
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
from datetime import date, datetime
from pathlib import Path

import zmq
from tqdm import tqdm

from disttrain.elastic import protocol
from disttrain.elastic.protocol import SECRET_ENV, Message
from disttrain.launcher.elastic_job import ElasticJob, Placement

sys.path.append(str(Path(__file__).resolve().parent))
import common  # noqa: E402
import netlab  # noqa: E402

log = logging.getLogger("benchmarks.chaos")

MODEL_FLAGS = [
    "--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2", "--model.block_size", "32",
    "--data.block_size", "32", "--data.batch_size", "4", "--data.val_batches", "2",
    "--method", "svd-int8-reconstruct", "--rank", "4",  # a per-step method: membership may change every 5 steps
]
JOIN_REQUEST = re.compile(rb"^(\S+) .*asking the coordinator at", re.MULTILINE)
FIRST_STEP = re.compile(rb"^(\S+) .*first step of generation (\d+) committed \(step (\d+)\)", re.MULTILINE)
FAILED_STEP = re.compile(rb"^(\S+) .*step (\d+) failed", re.MULTILINE)
MISMATCH = re.compile(rb"replica check at step")
DIGEST_LINE = re.compile(rb"replicas identical at step (\d+) \(digest ([0-9a-f]{16})\)")
PROGRESS = re.compile(rb"^(\S+) .*step (\d+): val loss", re.MULTILINE)
HEARTBEAT_TIMEOUT_S = 2.0
HANG_S = HEARTBEAT_TIMEOUT_S + 15.0  # no committed step for longer than this after a fault is a hang
RESTART_AFTER_S = 2.0
FAULTS = ("kill", "combined", "coordinator", "forming", "stop", "partition")  # the kinds whose recovery is measured
MEMBERSHIP_FAULTS = ("kill", "combined", "forming", "stop", "partition")  # ... by a new generation without the victim
MINIMUM_COUNTS = {"combined": 10, "coordinator": 5, "forming": 5, "stop": 10, "partition": 6}  # in a run of 100 events
AWAY_S = HEARTBEAT_TIMEOUT_S + 1.0  # how long a stopped or partitioned worker is gone: it is evicted


@dataclass
class Event:
    kind: str  # one of FAULTS, or "join"
    at: float  # wall-clock seconds (time.time())
    worker: int  # the victim, the stopped worker or the joiner (-1: none)
    recovery_s: float | None = None  # None: not recovered within HANG_S (a hang), or not measured
    steps_lost: int | None = None
    hang: bool = False
    back_s: float | None = None  # a stopped or partitioned worker: its return to its first committed step again


def log_stamp(raw: bytes) -> float:
    """The wall-clock time of a log stamp (HH:MM:SS.mmm, today; yesterday if that lies ahead)."""
    of_day = datetime.strptime(raw.decode(), "%H:%M:%S.%f").time()
    stamp = datetime.combine(date.today(), of_day).timestamp()
    return stamp - 86400 if stamp > time.time() + 3600 else stamp


def first_steps_after(text: bytes, after: float) -> list[tuple[float, int]]:
    """(time, committed step) of each 'first step of generation' line logged after ``after``."""
    found = []
    for match in FIRST_STEP.finditer(text):
        when = log_stamp(match.group(1))
        if when >= after:
            found.append((when, int(match.group(3))))
    return found


def failures_after(text: bytes, after: float) -> list[tuple[float, int]]:
    """(time, step) of each failed step logged after ``after``."""
    return [(when, int(m.group(2))) for m in FAILED_STEP.finditer(text) if (when := log_stamp(m.group(1))) >= after]


def steps_lost(text: bytes, after: float) -> int:
    """How far a worker went back: its first committed step after its first failure since ``after``
    must be the failed step's successor (a failure at step F is retried, and F + 1 is committed next)."""
    failures = failures_after(text, after)
    if not failures:
        return 0
    failed_at, failed_step = failures[0]
    resumed = first_steps_after(text, failed_at)
    return max(0, failed_step + 1 - resumed[0][1]) if resumed else 0


def progress_after(text: bytes, after: float) -> list[float]:
    """Times of the logged steps (evaluations every 10 steps) after ``after``."""
    return [when for match in PROGRESS.finditer(text) if (when := log_stamp(match.group(1))) >= after]


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True)
class LabPlacement(Placement):
    """The coordinator on the lab's hub, each worker in a host namespace of its own."""

    lab: netlab.NetLab | None = None

    def coordinator_command(self, argv: list[str]) -> list[str]:
        return self.lab.in_namespace(self.lab.hub, argv)

    def worker_command(self, slot: int, argv: list[str]) -> list[str]:
        return self.lab.in_namespace(self.lab.host(slot), argv)


def lab_placement(lab: netlab.NetLab) -> LabPlacement:
    return LabPlacement(
        coordinator_host=netlab.HUB_ADDRESS, slots=lab.hosts, env={"GLOO_SOCKET_IFNAME": netlab.HOST_INTERFACE}, lab=lab
    )


class Chaos:
    def __init__(self, job: ElasticJob, rng: random.Random, min_alive: int, max_alive: int, lab: netlab.NetLab | None):
        self.job = job
        self.lab = lab
        self.rng = rng
        self.min_alive = min_alive
        self.max_alive = max_alive
        self.killed: set[int] = set()
        self.events: list[Event] = []

    def alive(self) -> list[int]:
        return [i for i, proc in enumerate(self.job.workers) if proc.poll() is None and i not in self.killed]

    def _restart_coordinator(self) -> None:
        self.job.coordinator.kill()
        self.job.coordinator.wait()
        time.sleep(RESTART_AFTER_S)
        self.job.start_coordinator(start_workers=max(1, len(self.alive())))

    def _regrouped(self, event: Event, survivors: list[int]) -> Event:
        """Recovery of a membership fault: every survivor's first step in a generation formed after it."""

        def recovered() -> bool:
            return all(first_steps_after(self.job.log(i), event.at) for i in survivors)

        if not wait_until(recovered, max(0.0, HANG_S - (time.time() - event.at))):
            event.hang = True
            wait_until(recovered, 120)  # let the job settle (or not) before the next event
            return event
        firsts = [first_steps_after(self.job.log(i), event.at)[0] for i in survivors]
        event.recovery_s = max(when for when, _ in firsts) - event.at
        event.steps_lost = max(steps_lost(self.job.log(i), event.at) for i in survivors)
        return event

    def kill(self, kind: str = "kill") -> Event:
        victim = self.rng.choice(self.alive())
        event = Event(kind, time.time(), victim)
        if kind == "combined":
            self.job.coordinator.send_signal(signal.SIGKILL)
        self.job.signal(victim, signal.SIGKILL)
        self.killed.add(victim)
        survivors = self.alive()
        if kind == "forming":
            time.sleep(0.3)
        if kind in ("combined", "forming"):
            self._restart_coordinator()
        return self._regrouped(event, survivors)

    def away(self, kind: str) -> Event:
        """A stop or a partition of one worker for AWAY_S: the others regroup, then it comes back."""
        victim = self.rng.choice(self.alive())
        event = Event(kind, time.time(), victim)
        survivors = [i for i in self.alive() if i != victim]
        if kind == "stop":
            self.job.signal(victim, signal.SIGSTOP)
        else:
            self.lab.set_link(self.job.slots[victim], up=False)
        time.sleep(AWAY_S)
        if kind == "stop":
            self.job.signal(victim, signal.SIGCONT)
        else:
            self.lab.set_link(self.job.slots[victim], up=True)
        back = time.time()
        self._regrouped(event, survivors)
        if wait_until(lambda: bool(first_steps_after(self.job.log(victim), back)), 90):
            event.back_s = first_steps_after(self.job.log(victim), back)[0][0] - back
        return event

    def coordinator(self) -> Event:
        event = Event("coordinator", time.time(), -1)
        workers = self.alive()
        self._restart_coordinator()
        back = time.time()

        def progressed() -> bool:
            return all(progress_after(self.job.log(i), back) for i in workers)

        if wait_until(progressed, max(0.0, HANG_S - (time.time() - event.at))):
            event.recovery_s = max(progress_after(self.job.log(i), back)[0] for i in workers) - event.at
            event.steps_lost = 0
        else:
            event.hang = True
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

    def run(self, kind: str) -> Event:
        """One event of ``kind``: a fault when only min_alive workers are left comes after a join
        (an event of its own), so that every scheduled fault happens; a join at max_alive becomes a kill."""
        alive = len(self.alive())
        if kind in MEMBERSHIP_FAULTS and alive <= self.min_alive:
            self.run("join")
            time.sleep(1.0)
        elif kind == "join" and alive >= self.max_alive:
            kind = "kill"
        if kind == "partition" and self.lab is None:
            kind = "stop"
        if kind == "coordinator":
            event = self.coordinator()
        elif kind in ("stop", "partition"):
            event = self.away(kind)
        elif kind == "join":
            event = self.join()
        else:
            event = self.kill(kind)
        self.events.append(event)
        return event


def schedule(events: int, rng: random.Random) -> list[str]:
    """The kinds of ``events`` events in random order: at least MINIMUM_COUNTS (scaled to the run's
    length) of each special fault, the rest kill -9 and join half and half."""
    kinds = [kind for kind, count in MINIMUM_COUNTS.items() for _ in range(max(1, round(count * events / 100)))]
    rest = max(0, events - len(kinds))
    kinds += ["kill"] * (rest // 2) + ["join"] * (rest - rest // 2)
    rng.shuffle(kinds)
    return kinds[:events]


def _join_request_time(text: bytes) -> float | None:
    """When the worker asked the coordinator to join (after its imports)."""
    match = JOIN_REQUEST.search(text)
    return log_stamp(match.group(1)) if match else None


def step_rate(job: ElasticJob, worker: int, since: float, until: float) -> float | None:
    """Steps per second worker ``worker`` logged between two wall-clock times (from its evaluation lines)."""
    points = [
        (when, int(match.group(2)))
        for match in PROGRESS.finditer(job.log(worker))
        if since <= (when := log_stamp(match.group(1))) <= until
    ]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flood_frames(count: int, job: ElasticJob, incarnation: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, frame) pairs: junk bytes, oversized frames, frames signed with another secret, signed
    but stale messages, and replays of one signed heartbeat; none may be accepted."""
    secret = job.env[SECRET_ENV].encode()
    replayed = protocol.encode(Message("heartbeat", "disttrain", "flood-replay", 0, {"step": 0}, incarnation=incarnation), secret)
    frames: list[tuple[str, bytes]] = [("replay-original", replayed)]
    for index in range(count - 1):
        roll = rng.random()
        if roll < 0.45:
            frames.append(("junk", rng.randbytes(rng.randint(1, 200))))
        elif roll < 0.46:
            frames.append(("oversized", rng.randbytes(protocol.MAX_FRAME_BYTES + 1)))
        elif roll < 0.70:
            message = Message("join", "disttrain", f"flood-{index}", 0, protocol.join_body("c"))
            frames.append(("wrong-secret", protocol.encode(message, b"not-the-secret-of-this-job-0123")))
        elif roll < 0.85:
            message = Message("heartbeat", "disttrain", f"flood-{index}", 0, {"step": 0}, ts=time.time() - 3600, incarnation=incarnation)
            frames.append(("stale", protocol.encode(message, secret)))
        else:
            frames.append(("replay", replayed))
    return frames


def flood(job: ElasticJob, chaos: Chaos, count: int, window_s: float = 20.0) -> dict:
    """``count`` bad frames at the coordinator, spread over ``window_s`` while the job trains: answers,
    step rate before and during, coordinator memory."""
    rng = random.Random(1)
    worker = chaos.alive()[0]
    before_start = time.time()
    time.sleep(window_s)
    rate_before = step_rate(job, worker, before_start, time.time())
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(job.address)
    peer.send(protocol.encode(Message("heartbeat", "disttrain", "flood-probe", 0, {"step": 0}), job.env[SECRET_ENV].encode()))
    incarnation = protocol.decode(peer.recv(), job.env[SECRET_ENV].encode(), "disttrain").incarnation if peer.poll(5000) else ""
    frames = flood_frames(count, job, incarnation, rng)
    rss_before = resident_mib(job.coordinator.pid)
    answers: dict[str, int] = {}
    started = time.time()

    def collect() -> None:
        while peer.poll(0):
            frame = peer.recv()
            if frame == protocol.UNAUTHENTICATED:
                kind = "unauthenticated"
            else:
                try:
                    kind = protocol.decode(frame, job.env[SECRET_ENV].encode(), "disttrain").type
                except protocol.ProtocolError:
                    kind = "undecodable"
            answers[kind] = answers.get(kind, 0) + 1

    for index, (_, frame) in enumerate(frames):  # spread over the window, so that the step rate can show it
        peer.send(frame)
        collect()
        ahead = started + window_s * (index + 1) / len(frames) - time.time()
        if ahead > 0:
            time.sleep(ahead)
    sent_for = time.time() - started
    last_answer, answered = time.time(), sum(answers.values())
    while time.time() - last_answer < 3 and time.time() - started < 300:  # until the answers stop coming
        collect()
        if sum(answers.values()) > answered:
            last_answer, answered = time.time(), sum(answers.values())
        time.sleep(0.05)
    flood_end = max(last_answer, started + window_s)  # at least a window long, for a step rate
    time.sleep(max(0.0, flood_end - time.time()))
    rate_during = step_rate(job, worker, started, flood_end)
    peer.close(0)
    return {
        "frames": len(frames),
        "by_kind": {kind: sum(1 for k, _ in frames if k == kind) for kind in sorted({k for k, _ in frames})},
        "answers": answers,
        "accepted": max(0, answers.get("view", 0) - 1),  # the replayed heartbeat's original is the one legitimate view
        "sent_in_s": round(sent_for, 1),
        "answered_in_s": round(last_answer - started, 1),
        "coordinator_alive": job.coordinator.poll() is None,
        "coordinator_rss_mib": [round(rss_before, 1), round(resident_mib(job.coordinator.pid), 1)],
        "steps_per_s_before": rate_before,
        "steps_per_s_during": rate_during,
    }


def _stats(values: list[float | None]) -> dict:
    measured = [v for v in values if v is not None]
    return {
        "median_s": round(statistics.median(measured), 2) if measured else None,
        "max_s": round(max(measured), 2) if measured else None,
        "unmeasured": len(values) - len(measured),
    }


def summarise(chaos: Chaos, final_digests: list[str]) -> dict:
    by_kind = {
        kind: [e for e in chaos.events if e.kind == kind] for kind in (*FAULTS, "join")
    }
    restarts = [i for i, proc in enumerate(chaos.job.workers) if proc.poll() is not None and i not in chaos.killed]
    mismatches = sum(len(MISMATCH.findall(chaos.job.log(i))) for i in range(len(chaos.job.workers)))
    return {
        "events": len(chaos.events),
        "per_kind": {
            kind: {
                "count": len(events),
                "hangs": sum(e.hang for e in events),
                "committed_steps_lost": sum(e.steps_lost or 0 for e in events),
                "fault_to_next_step" if kind != "join" else "join_to_first_step": _stats([e.recovery_s for e in events]),
                **({"return_to_first_step": _stats([e.back_s for e in events])} if kind in ("stop", "partition") else {}),
            }
            for kind, events in by_kind.items()
        },
        "hangs": sum(e.hang for e in chaos.events),
        "survivor_restarts": len(restarts),
        "committed_steps_lost": sum(e.steps_lost or 0 for e in chaos.events),
        "replica_mismatches_found": mismatches,
        "final_digests_identical": len(set(final_digests)) == 1,
        "workers_at_end": len(final_digests),
    }


KIND_NAMES = {
    "kill": "kill -9 of a worker",
    "combined": "coordinator + worker killed together",
    "coordinator": "coordinator killed and restarted",
    "forming": "coordinator killed while a generation forms",
    "stop": "SIGSTOP / SIGCONT of a worker",
    "partition": "a worker's link down, then up",
    "join": "a worker joins",
}


def render_table(result: dict, results_file: Path = common.RESULTS_DIR / "chaos.json") -> str:
    s = result["summary"]
    rows = []
    for kind, numbers in s["per_kind"].items():
        timing = numbers.get("fault_to_next_step") or numbers["join_to_first_step"]
        back = numbers.get("return_to_first_step")
        rows.append([
            KIND_NAMES[kind], str(numbers["count"]), str(numbers["hangs"]), str(numbers["committed_steps_lost"]),
            _median_max(timing), _median_max(back) if back else "-",
        ])
    per_kind = common.markdown_table(
        [
            "event", "count", "hangs", "steps lost", "fault (or join request) to the next committed step, median / max",
            "the worker's return (SIGCONT, link up) to its first step as a member again",
        ],
        rows,
    )
    totals = common.markdown_table(
        ["measure", "result", "target"],
        [
            ["events", str(s["events"]), "≥ 100"],
            [
                "kill -9 → survivors' next step, max", f"{s['per_kind']['kill']['fault_to_next_step']['max_s']} s",
                f"≤ heartbeat timeout + 2 s = {HEARTBEAT_TIMEOUT_S + 2:.0f} s",
            ],
            ["hangs (no committed step within the heartbeat timeout + 15 s)", str(s["hangs"]), "0"],
            ["survivor restarts", str(s["survivor_restarts"]), "0"],
            ["committed steps lost", str(s["committed_steps_lost"]), "0"],
            ["replica mismatches found by the digest check", str(s["replica_mismatches_found"]), "0"],
            ["final parameters identical on all workers", str(s["final_digests_identical"]), "True"],
        ],
    )
    note = (
        f"\n\nMeasured on {common.machine_line(result['machine'])}: {result['method_note']} "
        f"{common.generated_by(result['command'], results_file)}"
    )
    return per_kind + "\n\n" + totals + flood_table(result.get("flood")) + note


def _median_max(timing: dict) -> str:
    return f"{timing['median_s']} s / {timing['max_s']} s" if timing["median_s"] is not None else "-"


def flood_table(flooded: dict | None) -> str:
    if not flooded:
        return ""
    before, during = flooded["steps_per_s_before"], flooded["steps_per_s_during"]
    slowdown = f"{before / during:.2f}x" if before and during else "-"
    kinds = ", ".join(f"{count} {kind}" for kind, count in flooded["by_kind"].items())
    answers = ", ".join(f"{count} {kind}" for kind, count in sorted(flooded["answers"].items()))
    rows = [
        ["bad frames sent while the job trained", f"{flooded['frames']} in {flooded['sent_in_s']} s, answered within {flooded['answered_in_s']} s ({kinds})", "≥ 100,000"],
        ["answers", answers or "none", "no signed view but the replayed frame's original"],
        ["accepted", str(flooded["accepted"]), "0"],
        ["coordinator still serving", str(flooded["coordinator_alive"]), "True"],
        ["coordinator memory before / after", f"{flooded['coordinator_rss_mib'][0]} / {flooded['coordinator_rss_mib'][1]} MiB", "reported"],
        ["job's steps per second before / during", f"{before and round(before, 2)} / {during and round(during, 2)} ({slowdown} slower)", "within 2x"],
    ]
    return "\n\n" + common.markdown_table(["flood", "result", "target"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="workers at the start")
    parser.add_argument("--min-alive", type=int, default=2)
    parser.add_argument("--max-alive", type=int, default=5)
    parser.add_argument("--pause-s", type=float, default=2.0, help="mean quiet time between events")
    parser.add_argument("--flood-frames", type=int, default=100_000, help="bad frames sent at the coordinator after the events (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "chaos.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    parser.add_argument("--no-lab", action="store_true", help="run on this machine's loopback, without partitions (no root needed)")
    args = parser.parse_args(argv)
    common.setup_logging()
    if args.render_only:
        result = common.read_results(args.out)
        if result is None:
            return 2
        return 0 if common.publish_table(render_table(result, args.out), "chaos-table", args.doc, args.out.parent) else 1
    lab = None if args.no_lab else netlab.NetLab(hosts=args.max_alive, rate_mbit=None, prefix="dtchaos")
    if lab is not None and (missing := netlab.missing_requirements()):
        log.error("the network lab needs %s; or run with --no-lab (no partitions)", "; ".join(missing))
        return 2
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="disttrain-chaos-") as workdir:
        placement = Placement()
        if lab is not None:
            lab.setup()
            lab.enter(lab.hub)  # the flood's socket must reach the coordinator on the hub
            placement = lab_placement(lab)
        job = ElasticJob(
            Path(workdir), MODEL_FLAGS, steps=10**6, link_mbit=2.0, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, placement=placement
        )
        chaos = Chaos(job, rng, args.min_alive, args.max_alive, lab)
        try:
            job.start_coordinator(start_workers=args.workers)
            for _ in range(args.workers):
                job.start_worker()
            job.wait_for_step(0, 10)
            for kind in tqdm(schedule(args.events, rng), desc="events"):
                time.sleep(rng.uniform(0.5, 1.5) * args.pause_s)
                event = chaos.run(kind)
                log.info("%s (worker %d): %s s%s", event.kind, event.worker, event.recovery_s, ", a HANG" if event.hang else "")
            flooded = flood(job, chaos, args.flood_frames) if args.flood_frames else None
            summary = summarise(chaos, _final_digests(job, chaos.alive()))
        finally:
            job.close()
            if lab is not None:
                lab.teardown()
    where = (
        "each worker in a network namespace of its own, the coordinator on the lab's hub (uncapped veth links)"
        if lab is not None else "all processes on this machine's loopback (no partitions)"
    )
    result = {
        "machine": common.machine_description(),
        "method_note": (
            f"{args.workers} workers at the start, between {args.min_alive} and {args.max_alive} alive, a 2-layer "
            "byte-level GPT trained with svd-int8-reconstruct (rank 4), uplinks paced to 2 Mbit/s, heartbeat every 0.25 s, heartbeat timeout "
            f"{HEARTBEAT_TIMEOUT_S:.0f} s, membership check every 5 steps, coordinators restarted {RESTART_AFTER_S:.0f} s "
            f"after they were killed, stopped or partitioned workers away for {AWAY_S:.0f} s; {where}; times from the workers' own log stamps."
        ),
        "command": "python benchmarks/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": summary,
        "flood": flooded,
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

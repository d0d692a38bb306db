"""The coordinator at its edges: ports it cannot use, the end of a job, floods, readable logs."""

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disttrain.elastic import protocol
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig, PortError
from disttrain.elastic.protocol import SECRET_ENV, Message
from disttrain.elastic.throttle import Throttle
from disttrain.launcher.local import free_port

SECRET = b"0123456789abcdef0123456789abcdef"
JOB = "edges"
A, B, C = "a1b2" + "0" * 28, "c3d4" + "0" * 28, "e5f6" + "0" * 28


def coordinator(**overrides) -> Coordinator:
    settings = {"job": JOB, "join_grace_s": 0.5, **overrides}
    return Coordinator(CoordinatorConfig(**settings), SECRET)


def send(coord: Coordinator, kind: str, sender: str, body: dict, now: float, gen: int = 0) -> Message:
    message = Message(kind, JOB, sender, gen, body, incarnation=coord.incarnation)
    frame = coord.handle(b"peer", protocol.encode(message, SECRET), now=now)
    return protocol.decode(frame, SECRET, JOB)


def join(coord: Coordinator, sender: str, now: float) -> Message:
    body = protocol.join_body("cfg")
    return send(coord, "join", sender, body, now)


def leave(coord: Coordinator, sender: str, now: float, finished: bool, step: int = 40, digest: str = "d1g3st") -> Message:
    return send(coord, "leave", sender, {"step": step, "finished": finished, "digest": digest}, now, gen=coord.gen)


def running(*workers: str, **overrides) -> Coordinator:
    coord = coordinator(**overrides)
    for worker in workers:
        join(coord, worker, now=0.0)
    coord.tick(now=0.6)
    assert coord.gen == 1 and coord.roster == list(workers)
    return coord


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


# --- ports ----------------------------------------------------------------------------
@pytest.fixture
def held_port():
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_bind_port_of_65535_is_refused_as_the_store_port_would_be_65536():
    with pytest.raises(PortError, match="rendezvous store's port .*bind port \\+ 1.* would be 65536.*--store-port"):
        coordinator(bind="tcp://127.0.0.1:65535")
    coordinator(bind="tcp://127.0.0.1:65535", store_port=29401)  # a store port of its own is fine


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"bind": "tcp://127.0.0.1:70000"}, "--bind 'tcp://127.0.0.1:70000' is malformed"),
        ({"bind": "127.0.0.1:29400"}, "--bind '127.0.0.1:29400' is malformed"),
        ({"store_port": 70000}, "--store-port 70000 is out of range"),
        ({"bind": "tcp://127.0.0.1:29400", "store_port": 29400}, "--store-port 29400 is the bind port"),
    ],
)
def test_ports_out_of_range_or_clashing_are_refused_before_anything_is_served(settings, reason):
    with pytest.raises(ValueError, match=reason):
        coordinator(**settings)


def test_serve_refuses_a_bind_port_in_use_naming_it(held_port):
    coord = coordinator(bind=f"tcp://127.0.0.1:{held_port}", store_port=free_port())
    with pytest.raises(PortError, match=f"port {held_port}, the coordinator's port \\(--bind .*\\), is in use.*--bind"):
        coord.serve()


def test_serve_refuses_a_store_port_in_use_naming_it_as_the_rendezvous_store_port(held_port):
    bind = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(PortError, match=f"port {held_port}, the rendezvous store's port .*, is in use.*--store-port"):
        coordinator(bind=bind, store_port=held_port).serve()
    stop = threading.Event()
    stop.set()
    coordinator(bind=bind, store_port=free_port()).serve(stop)  # the refused attempt let go of its bind port


@pytest.mark.parametrize("taken", ["bind", "store"])
def test_disttrain_coordinator_on_a_taken_port_prints_one_line_and_exits_2(held_port, taken):
    port, store = (held_port, free_port()) if taken == "bind" else (free_port(), held_port)
    result = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "coordinator", "--bind", f"tcp://127.0.0.1:{port}", "--store-port", str(store)],
        env={**os.environ, SECRET_ENV: "s" * 32}, capture_output=True, text=True, timeout=120, check=False,
    )
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and f"port {held_port}" in errors[0] and "Traceback" not in result.stderr


# --- the end of a job -------------------------------------------------------------------
def test_members_that_finish_leave_quietly_and_the_job_is_finished(caplog):
    coord = running(A, B)
    with caplog.at_level(logging.INFO, "disttrain.elastic.coordinator"):
        leave(coord, A, now=1.0, finished=True)
        leave(coord, B, now=1.1, finished=True)
    assert messages(caplog) == [
        f"job {JOB!r} finished at step 40 (parameter digest d1g3st): workers that join from now on are told so",
        "worker wa1b2 left (run finished)",
        "worker wc3d4 left (run finished)",
    ]
    assert coord.finished == (40, "d1g3st") and not coord.broken


def test_a_worker_that_joins_after_the_job_finished_is_told_the_step_and_digest(caplog):
    coord = running(A)
    leave(coord, A, now=1.0, finished=True)
    with caplog.at_level(logging.INFO, "disttrain.elastic.coordinator"):
        for now in (2.0, 30.0):
            answer = join(coord, C, now=now)
            assert answer.type == "finished" and answer.body == {"step": 40, "digest": "d1g3st"}
            coord.tick(now=now + 1)
    assert coord.gen == 1 and not coord.members
    assert messages(caplog) == ["told worker we5f6 that the job finished at step 40"] * 2


def test_a_worker_still_waiting_when_the_job_finishes_is_told_at_its_next_heartbeat():
    coord = running(A, min_workers=1)
    join(coord, C, now=0.7)  # admitted at the next generation, which never comes
    leave(coord, A, now=0.8, finished=True)
    answer = send(coord, "heartbeat", C, {"step": 0}, now=0.9)
    assert answer.type == "finished" and answer.body["step"] == 40


def test_a_leave_before_the_end_still_breaks_the_generation(caplog):
    coord = running(A, B)
    with caplog.at_level(logging.INFO, "disttrain.elastic.coordinator"):
        leave(coord, A, now=1.0, finished=False)
    assert messages(caplog) == ["worker wa1b2 left; generation 1 must be replaced"]
    assert coord.broken and coord.finished is None
    assert join(coord, C, now=1.1).type == "view"


def test_only_a_member_of_the_generation_can_finish_the_job():
    coord = running(A)
    join(coord, C, now=0.7)
    leave(coord, C, now=0.8, finished=True)  # a waiting worker, not in the roster
    assert coord.finished is None


@given(st.lists(st.tuples(st.text(min_size=1, max_size=40), st.sampled_from(["cfg", "other"])), max_size=8))
def test_once_finished_no_join_changes_membership(joiners):
    coord = running(A)
    leave(coord, A, now=1.0, finished=True)
    for now, (sender, config) in enumerate(joiners, start=2):
        body = protocol.join_body(config, claim_gen=5, claim_roster=[sender])
        assert send(coord, "join", sender, body, now=float(now)).type == "finished"
    assert (coord.gen, coord.roster, coord.members) == (1, [A], {})


# --- what workers are told, and what the log says ----------------------------------------
def test_views_count_the_workers_joined_and_needed():
    coord = coordinator(start_workers=3, min_workers=2)
    assert (join(coord, A, now=0.0).body["joined"], join(coord, B, now=0.1).body["joined"]) == (1, 2)
    assert join(coord, C, now=0.2).body["needed"] == 3
    coord.tick(now=1.0)
    view = send(coord, "heartbeat", A, {"step": 0}, now=1.1)
    assert (view.body["gen"], view.body["joined"], view.body["needed"]) == (1, 3, 2)  # later generations need the quorum


def test_generations_name_workers_by_short_names(caplog):
    with caplog.at_level(logging.INFO, "disttrain.elastic.coordinator"):
        running(A, B)
    assert "generation 1: 2 workers (wa1b2, wc3d4)" in messages(caplog)
    assert f"worker wa1b2 ({socket.gethostname()}, pid {os.getpid()}) asks to join" in messages(caplog)


def test_a_flood_of_bad_frames_logs_one_line_then_one_summary(caplog):
    coord = coordinator()
    with caplog.at_level(logging.WARNING, "disttrain.elastic.coordinator"):
        for index in range(10_000):
            assert coord.handle(b"flood", b"\xc1", now=index / 10_000) is None  # shorter than any answer
        coord.tick(now=10.5)
    assert coord.refusals == 10_000
    assert messages(caplog) == [
        "refused a message from peer 666c6f6f64: malformed frame: FormatError",
        "9999 more like it in the last 10 s, the latest: refused a message from peer 666c6f6f64: malformed frame: FormatError",
    ]


class _Clocked(logging.Handler):
    """Keeps (the test's clock, message) of every record."""

    def __init__(self):
        super().__init__()
        self.clock = 0.0
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.clock, record.getMessage()))


@given(st.lists(st.tuples(st.sampled_from("ab"), st.floats(0, 100)), max_size=300))
def test_throttled_warnings_are_never_lost_and_at_most_one_line_per_window(events):
    logger = logging.getLogger("test-throttle")
    logger.propagate = False
    handler = _Clocked()
    logger.handlers = [handler]
    throttle = Throttle(logger, every_s=10.0)
    for index, (kind, now) in enumerate(sorted(events, key=lambda event: event[1])):
        handler.clock = now
        throttle.warning(kind, f"{kind}#{index}", now)
    handler.clock = 1000.0
    throttle.flush(1000.0)
    for kind in "ab":
        lines = [(when, text) for when, text in handler.lines if text.rpartition(" ")[2].startswith(kind)]
        summarised = sum(int(text.split(" ", 1)[0]) for _, text in lines if " more like it " in text)
        assert len(lines) - sum(" more like it " in text for _, text in lines) + summarised == sum(k == kind for k, _ in events)
        assert all(later - earlier >= 10.0 for (earlier, _), (later, _) in itertools.pairwise(lines))


def test_a_worker_that_does_not_fit_in_a_full_generation_waits_without_replacing_it():
    coord = running(A, B, max_workers=2)
    join(coord, C, now=1.0)
    for tick in range(20):
        coord.tick(now=2.0 + tick)
        send(coord, "heartbeat", A, {"step": 1}, now=2.0 + tick, gen=coord.gen)
        send(coord, "heartbeat", B, {"step": 1}, now=2.0 + tick, gen=coord.gen)
        send(coord, "heartbeat", C, {"step": 0}, now=2.0 + tick)
    assert coord.gen == 1 and coord.roster == [A, B]
    leave(coord, B, now=22.0, finished=False)
    send(coord, "failed", A, {"step": 1}, now=22.1, gen=coord.gen)  # A's next collective fails without B
    send(coord, "heartbeat", C, {"step": 0}, now=22.2)
    coord.tick(now=22.3)
    assert coord.gen == 2 and coord.roster == [A, C]


# --- nodes of several processes -----------------------------------------------------
def join_node(coord: Coordinator, node: str, local_rank: int, now: float, local_size: int = 2) -> Message:
    body = protocol.join_body("cfg", node=node, local_rank=local_rank, local_size=local_size)
    return send(coord, "join", process_of(node, local_rank), body, now)


def process_of(node: str, local_rank: int) -> str:
    return f"{node}{local_rank}".ljust(32, "0")


def nodes_running(*nodes: str, **overrides) -> Coordinator:
    coord = coordinator(**overrides)
    for node in nodes:
        for local_rank in (1, 0):
            join_node(coord, node, local_rank, now=0.0)
    coord.tick(now=0.6)
    return coord


def test_a_node_enters_a_generation_once_all_its_processes_joined_ranked_together_by_local_rank():
    coord = coordinator()
    join_node(coord, "n1", 1, now=0.0)
    coord.tick(now=1.0)
    assert coord.gen == 0
    join_node(coord, "n1", 0, now=1.0)
    coord.tick(now=2.0)
    assert coord.gen == 1 and coord.roster == [process_of("n1", 0), process_of("n1", 1)]


def test_worker_counts_count_nodes_not_processes():
    coord = nodes_running("n1", "n2", start_workers=2)
    assert coord.gen == 1 and len(coord.roster) == 4
    view = join_node(coord, "n3", 0, now=1.0)
    assert view.body["joined"] == 2  # n3 is not whole yet


def test_when_a_process_of_a_node_goes_silent_its_node_mates_are_told_the_node_was_lost():
    coord = nodes_running("n1", "n2")
    for now in (1.0, 2.0, 3.0):  # n2's local rank 1 falls silent
        for worker in (process_of("n1", 0), process_of("n1", 1), process_of("n2", 0)):
            send(coord, "heartbeat", worker, {"step": 1}, now=now, gen=coord.gen)
    coord.tick(now=3.0)
    mate = send(coord, "heartbeat", process_of("n2", 0), {"step": 1}, now=3.1, gen=coord.gen)
    assert mate.body["status"] == "node_lost"
    for worker in (process_of("n1", 0), process_of("n1", 1)):
        send(coord, "failed", worker, {"step": 1}, now=3.2, gen=coord.gen)
    coord.tick(now=3.3)
    assert coord.gen == 2 and coord.roster == [process_of("n1", 0), process_of("n1", 1)]


def test_a_node_of_another_size_is_refused_naming_the_fix():
    coord = nodes_running("n1")
    answer = join_node(coord, "n2", 0, now=1.0, local_size=3)
    assert answer.type == "refused" and "--nproc-per-node" in answer.body["reason"]


def test_two_processes_of_a_node_that_claim_the_same_local_rank_are_refused():
    coord = coordinator()
    join_node(coord, "n1", 0, now=0.0)
    body = protocol.join_body("cfg", node="n1", local_rank=0, local_size=2)
    answer = send(coord, "join", "other".ljust(32, "0"), body, now=0.1)
    assert answer.type == "refused" and "LOCAL_RANK" in answer.body["reason"]


@given(st.permutations([(node, rank) for node in ("n1", "n2", "n3") for rank in (0, 1)]), st.integers(1, 5))
def test_every_roster_is_whole_nodes_each_in_local_rank_order(arrivals, ticks_between):
    coord = coordinator(join_grace_s=0.0)
    now = 0.0
    for index, (node, local_rank) in enumerate(arrivals):
        join_node(coord, node, local_rank, now=now)
        if index % ticks_between == 0:
            coord.tick(now=now)
            for start in range(0, len(coord.roster), 2):
                pair = coord.roster[start:start + 2]
                assert len(pair) == 2 and [coord.members[w].local_rank for w in pair] == [0, 1]
                assert coord.members[pair[0]].node == coord.members[pair[1]].node
        now += 0.01

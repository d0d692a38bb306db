"""What a stranger on the network gets from a real coordinator on a real socket: no signed answer,
no job details, no amplification, no rendezvous store off the bound address, no timestamp tricks."""

from __future__ import annotations

import math
import socket
import threading
import time

import msgpack
import pytest
import zmq

from disttrain.elastic import protocol
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig
from disttrain.elastic.protocol import Message
from disttrain.launcher.local import free_port

SECRET = b"0123456789abcdef0123456789abcdef"
JOB = "security"


def dealer(bind: str) -> zmq.Socket:
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(bind)
    return peer


@pytest.fixture
def served():
    """A coordinator serving on 127.0.0.1 in this process: (its config, a function sending one frame)."""
    config = CoordinatorConfig(bind=f"tcp://127.0.0.1:{free_port()}", job=JOB, store_port=free_port())
    stop = threading.Event()
    thread = threading.Thread(target=Coordinator(config, SECRET).serve, args=(stop,), daemon=True)
    thread.start()
    peer = dealer(config.bind)

    def send(frame: bytes, wait_s: float = 1.0) -> bytes | None:
        peer.send(frame)
        return peer.recv() if peer.poll(int(wait_s * 1000)) else None

    yield config, send
    peer.close(0)
    stop.set()
    thread.join(timeout=5)


def join(ts: float | None = None) -> Message:
    body = protocol.join_body("cfg")
    message = Message("join", JOB, "a1b2" + "0" * 28, 0, body)
    if ts is not None:
        message.ts = ts
    return message


def test_a_well_signed_join_is_answered_with_a_signed_view(served):
    _, send = served
    assert protocol.decode(send(protocol.encode(join(), SECRET)), SECRET, JOB).type == "view"


@pytest.mark.parametrize("frame", [b"junk!", b"\xc1" * 5, msgpack.packb([b"x", b"y"]), protocol.encode(join(), b"another-secret-of-32-bytes-long!")])
def test_a_frame_that_fails_authentication_gets_at_most_six_constant_bytes(served, frame):
    _, send = served
    answer = send(frame)
    assert answer is None or (answer == protocol.UNAUTHENTICATED and len(answer) <= len(frame))
    assert JOB.encode() not in (answer or b"")


@pytest.mark.parametrize("offset_s", [math.nan, math.inf, -math.inf, 61.0, -61.0])
def test_a_signed_join_with_a_non_finite_or_out_of_window_timestamp_is_refused(served, offset_s):
    _, send = served
    answer = protocol.decode(send(protocol.encode(join(time.time() + offset_s), SECRET)), SECRET, JOB)
    assert answer.type == "refused" and "timestamp" in answer.body["reason"]


def reachable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def test_the_rendezvous_store_listens_only_on_the_bound_address(served):
    config, send = served
    assert send(protocol.encode(join(), SECRET)) is not None  # serving, the store is up
    assert reachable("127.0.0.1", config.rendezvous_port)
    assert not reachable("127.0.0.2", config.rendezvous_port)  # loopback too, but not the bound address


def serve_in_thread(config: CoordinatorConfig) -> tuple[Coordinator, threading.Event, threading.Thread]:
    coord = Coordinator(config, SECRET)
    stop = threading.Event()
    thread = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
    thread.start()
    return coord, stop, thread


def ask(peer: zmq.Socket, frame: bytes) -> Message:
    peer.send(frame)
    assert peer.poll(5000)
    return protocol.decode(peer.recv(), SECRET, JOB)


def test_frames_captured_before_a_restart_count_for_nothing_with_the_new_coordinator():
    config = CoordinatorConfig(bind=f"tcp://127.0.0.1:{free_port()}", job=JOB, store_port=free_port(), heartbeat_timeout_s=30.0)
    first, stop, thread = serve_in_thread(config)
    peer = dealer(config.bind)
    worker = "a1b2" + "0" * 28
    view = ask(peer, protocol.encode(join(), SECRET))
    assert view.type == "view" and view.incarnation == first.incarnation
    captured = [
        protocol.encode(Message(kind, JOB, worker, view.gen, body, incarnation=first.incarnation), SECRET)
        for kind, body in [("heartbeat", {"step": 7}), ("heartbeat", {"step": 8}), ("failed", {"step": 8})]
    ]
    for frame in captured:
        ask(peer, frame)
    peer.close(0)
    stop.set()
    thread.join(timeout=5)
    second, stop, thread = serve_in_thread(config)  # the restart, on the same ports
    replayer = dealer(config.bind)  # a fresh connection: a frame sent while the old one reconnects may be dropped
    try:
        answers = [ask(replayer, frame) for frame in captured]
        assert [a.type for a in answers] == ["restarted"] * 3
        assert second.incarnation != first.incarnation and all(a.incarnation == second.incarnation for a in answers)
        assert worker not in second.members and not second.broken and second.gen == 0
    finally:
        replayer.close(0)
        stop.set()
        thread.join(timeout=5)

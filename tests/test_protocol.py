"""The control-plane protocol and the coordinator's handling of bad input."""

import hashlib
import hmac
import re
import time

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from disttrain.elastic import protocol
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig
from disttrain.elastic.protocol import Message, ProtocolError, ReplayGuard

SECRET = b"0123456789abcdef0123456789abcdef"
JOB = "job-under-test"


def join(sender: str = "w1", config: str = "cfg", **body) -> Message:
    return Message("join", JOB, sender, 0, protocol.join_body(config, **body))


def coordinator(**overrides) -> Coordinator:
    settings = {"job": JOB, "min_workers": 1, "join_grace_s": 0.0, **overrides}
    return Coordinator(CoordinatorConfig(**settings), SECRET)


def reply(coord: Coordinator, message: Message, secret: bytes = SECRET, now: float = 0.0) -> Message:
    """The coordinator's answer to ``message``, sent to this coordinator's incarnation unless it names one."""
    message.incarnation = message.incarnation or coord.incarnation
    return protocol.decode(coord.handle(b"id", protocol.encode(message, secret), now=now), SECRET, JOB)


def test_a_signed_message_round_trips():
    message = join()
    decoded = protocol.decode(protocol.encode(message, SECRET), SECRET, JOB)
    assert (decoded.type, decoded.sender, decoded.body) == ("join", "w1", message.body)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "bad signature"),
        (lambda f: b"\x00" * (protocol.MAX_FRAME_BYTES + 1), "exceeds"),
        (lambda f: b"\xc1garbage", "malformed frame"),
        (lambda f: msgpack.packb([b"x"]), "expected \\[payload, mac\\]"),
    ],
    ids=["tampered", "oversized", "garbage", "wrong-shape"],
)
def test_damaged_frames_are_refused_with_the_reason(mutate, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(mutate(protocol.encode(join(), SECRET)), SECRET, JOB)


def test_a_message_signed_with_another_secret_is_refused():
    with pytest.raises(ProtocolError, match="bad signature"):
        protocol.decode(protocol.encode(join(), b"another-secret-of-some-length"), SECRET, JOB)


def test_a_message_for_another_job_is_refused_and_names_that_job():
    message = join()
    message.job = "other-job"
    with pytest.raises(protocol.JobMismatch, match="for job 'other-job'") as refused:
        protocol.decode(protocol.encode(message, SECRET), SECRET, JOB)
    assert refused.value.job == "other-job"


@pytest.mark.parametrize("offset_s", [-3600, -61, 61, float("nan"), float("inf"), float("-inf")])
def test_a_stale_future_or_non_finite_timestamp_is_refused(offset_s):
    message = join()
    message.ts = time.time() + offset_s
    with pytest.raises(ProtocolError, match="stale, future or non-finite timestamp"):
        protocol.decode(protocol.encode(message, SECRET), SECRET, JOB)


def test_unknown_types_and_missing_fields_are_refused():
    with pytest.raises(ProtocolError, match="unknown message type 'reboot'"):
        protocol.decode(protocol.encode(Message("reboot", JOB, "w", 0, {}), SECRET), SECRET, JOB)
    with pytest.raises(ProtocolError, match="join body lacks field 'pid'"):
        protocol.decode(protocol.encode(Message("join", JOB, "w", 0, {"host": "h"}), SECRET), SECRET, JOB)


def test_a_replayed_message_is_refused():
    guard = ReplayGuard()
    message = protocol.decode(protocol.encode(join(), SECRET), SECRET, JOB)
    guard.check(message)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(message)


def test_coordinator_admits_a_signed_join_and_answers_a_mis_signed_one_with_six_constant_bytes():
    coord = coordinator()
    assert reply(coord, join("good")).body["status"] == "active"
    answer = coord.handle(b"id", protocol.encode(join("intruder"), b"not-the-job-secret-at-all"), now=0.0)
    assert answer == protocol.UNAUTHENTICATED and len(answer) == 6
    assert set(coord.members) == {"good"}


def test_coordinator_refuses_a_replayed_join():
    coord = coordinator()
    frame = protocol.encode(join("w1"), SECRET)
    coord.handle(b"id", frame, now=0.0)
    coord.members.clear()
    answer = protocol.decode(coord.handle(b"id", frame, now=0.1), SECRET, JOB)
    assert answer.type == "refused" and "replayed" in answer.body["reason"]
    assert not coord.members


def test_coordinator_refuses_a_worker_with_a_different_config():
    coord = coordinator()
    reply(coord, join("a", config="one"))
    answer = reply(coord, join("b", config="two"))
    assert answer.type == "refused" and "config differs" in answer.body["reason"]


def test_workers_may_not_send_coordinator_messages():
    coord = coordinator()
    body = {
        "you": "w", "gen": 9, "roster": [], "store_port": 1, "status": "active", "last_break": 0, "refresh_epoch": 0,
        "joined": 1, "needed": 1, "store_prefix": "",
    }
    answer = reply(coord, Message("view", JOB, "w", 0, body))
    assert answer.type == "refused" and "may not send 'view'" in answer.body["reason"]


# A value of each type a schema names, and of types no schema field has.
TYPED = {
    int: st.integers(-(2**40), 2**40),
    float: st.floats(allow_nan=False, allow_infinity=False),
    str: st.text(max_size=8),
    bool: st.booleans(),
    list: st.lists(st.text(max_size=4), max_size=3),
}
ANY_VALUE = st.one_of(*TYPED.values(), st.binary(max_size=4), st.none())


@given(st.sampled_from(sorted(protocol.SCHEMAS)), st.data())
def test_a_body_decodes_exactly_when_every_field_has_its_schema_type(kind, data):
    """Strict schemas: a bool is not an int, an int may stand for a float, nothing else converts."""
    schema = protocol.SCHEMAS[kind]
    body = {name: data.draw(TYPED[want] if data.draw(st.booleans()) else ANY_VALUE, label=name) for name, want in schema.items()}
    well_typed = all(type(body[name]) is want or (want is float and type(body[name]) is int) for name, want in schema.items())
    frame = protocol.encode(Message(kind, JOB, "w", 0, body), SECRET)
    if well_typed:
        assert protocol.decode(frame, SECRET, JOB).body == body
    else:
        with pytest.raises(ProtocolError, match="has type"):
            protocol.decode(frame, SECRET, JOB)


HOSTS = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True) | st.sampled_from(["*", "[::1]"])


@given(HOSTS, st.integers(1, 65535))
def test_check_address_reads_host_and_port(host, port):
    assert protocol.check_address(f"tcp://{host}:{port}") == (host, port)


@given(HOSTS, st.integers(-5, 10**6).filter(lambda port: not 1 <= port <= 65535))
def test_check_address_refuses_ports_out_of_range(host, port):
    address = f"tcp://{host}:{port}"
    with pytest.raises(ValueError, match=re.escape(repr(address)) + ".*tcp://HOST:PORT"):
        protocol.check_address(address)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:29400", "tcp://127.0.0.1", "tcp://:29400", "udp://h:1", "tcp://h:port", "tcp://h:29400/"]
)
def test_check_address_refuses_malformed_addresses_naming_them_and_the_form(address):
    with pytest.raises(ValueError, match=re.escape(repr(address)) + ".*tcp://HOST:PORT"):
        protocol.check_address(address)


@given(st.binary(max_size=512))
def test_fuzzed_frames_never_crash_the_coordinator_are_never_accepted_and_get_no_signed_answer(frame):
    coord = coordinator()
    answer = coord.handle(b"fuzz", frame, now=0.0)
    assert answer in (None, protocol.UNAUTHENTICATED) and (answer is None or len(answer) <= len(frame))
    assert not coord.members and coord.gen == 0


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["v", "type", "job", "sender", "gen", "nonce", "ts", "body", "x"]), values))
def test_fuzzed_signed_payloads_are_refused_unless_well_formed(fields):
    """Even with a valid signature, a payload that breaks the schema is refused, never a crash."""
    coord = coordinator()
    payload = msgpack.packb(fields, use_bin_type=True)
    frame = msgpack.packb([payload, hmac.new(SECRET, payload, hashlib.sha256).digest()], use_bin_type=True)
    answer = protocol.decode(coord.handle(b"fuzz", frame, now=0.0), SECRET, JOB)
    assert answer.type == "refused"
    assert not coord.members


def started(workers: list[str], **overrides) -> Coordinator:
    """A coordinator whose first generation holds ``workers`` (they join within the grace period)."""
    coord = coordinator(join_grace_s=0.5, **overrides)
    for worker in workers:
        reply(coord, join(worker), now=0.0)
    coord.tick(now=0.6)
    assert coord.gen == 1 and coord.roster == workers
    return coord


def test_a_silent_member_is_evicted_and_a_new_generation_formed():
    coord = started(["a", "b"], heartbeat_timeout_s=3.0)
    view = reply(coord, Message("heartbeat", JOB, "a", 1, {"step": 5}), now=3.5)
    assert view.body["last_break"] == 1 and view.body["status"] == "waiting"  # a must abandon generation 1
    reply(coord, Message("failed", JOB, "a", 1, {"step": 5}), now=3.6)  # a confirms it stopped
    assert coord.gen == 2 and coord.roster == ["a"]


def test_no_generation_forms_below_the_quorum():
    coord = started(["a", "b"], heartbeat_timeout_s=3.0, min_workers=2)
    reply(coord, Message("heartbeat", JOB, "a", 1, {"step": 5}), now=3.5)
    assert coord.gen == 1 and coord.broken
    assert reply(coord, Message("heartbeat", JOB, "a", 1, {"step": 5}), now=3.6).body["status"] == "waiting"


def test_a_failure_report_regroups_once_every_member_confirms_or_falls_silent():
    coord = started(["a", "b", "c"], heartbeat_timeout_s=3.0, suspect_after_s=1.0)
    reply(coord, Message("failed", JOB, "a", 1, {"step": 7}), now=0.7)
    reply(coord, Message("failed", JOB, "b", 1, {"step": 7}), now=0.8)
    assert coord.broken and coord.gen == 1  # c has neither confirmed nor been silent for long
    coord.tick(now=1.1)  # c silent for 1.1 s > suspect_after_s
    assert coord.gen == 2 and coord.roster == ["a", "b"]


def test_a_joiner_is_added_to_the_running_generation_without_breaking_it():
    coord = started(["a", "b"])
    reply(coord, join("c"), now=1.0)
    coord.tick(now=1.6)
    assert coord.gen == 2 and coord.roster == ["a", "b", "c"] and coord.last_break == 0


def test_a_restarted_coordinator_adopts_the_generation_workers_still_run():
    coord = coordinator()
    claim = reply(coord, join("b", claim_gen=7, claim_roster=["a", "b"]))
    assert coord.gen == 7 and coord.roster == ["a", "b"]
    assert claim.body["status"] == "active"


def test_adaptive_refresh_is_requested_when_captured_energy_drops():
    coord = started(["a"], refresh="adaptive", energy_threshold=0.5)
    reply(coord, Message("energy", JOB, "a", 1, {"step": 10, "energy": 0.9}), now=0.7)
    assert coord.refresh_epoch == 0
    view = reply(coord, Message("energy", JOB, "a", 1, {"step": 15, "energy": 0.3}), now=0.8)
    assert coord.refresh_epoch == 1 and view.body["refresh_epoch"] == 1
    reply(coord, Message("energy", JOB, "a", 1, {"step": 15, "energy": 0.2}), now=0.9)  # same step: once
    assert coord.refresh_epoch == 1


def test_the_fixed_schedule_ignores_energy_reports():
    coord = started(["a"])
    reply(coord, Message("energy", JOB, "a", 1, {"step": 10, "energy": 0.01}), now=0.7)
    assert coord.refresh_epoch == 0


def test_a_message_for_an_earlier_incarnation_is_answered_restarted_and_changes_nothing():
    coord = started(["a", "b"], heartbeat_timeout_s=3.0)
    stale = reply(coord, Message("heartbeat", JOB, "a", 1, {"step": 5}, incarnation="0123456789abcdef"), now=2.9)
    assert stale.type == "restarted" and stale.incarnation == coord.incarnation
    assert coord.members["a"].last_seen == 0.0 and coord.members["a"].step == 0  # the heartbeat counted for nothing
    failed = reply(coord, Message("failed", JOB, "a", 1, {"step": 5}, incarnation="0123456789abcdef"), now=2.9)
    assert failed.type == "restarted" and not coord.broken


def test_only_a_join_may_come_before_the_worker_heard_the_coordinators_incarnation():
    coord = coordinator()
    first = protocol.decode(coord.handle(b"id", protocol.encode(join("w"), SECRET), now=0.0), SECRET, JOB)
    assert first.type == "view" and first.incarnation == coord.incarnation
    beat = protocol.encode(Message("heartbeat", JOB, "w", 0, {"step": 1}), SECRET)
    assert protocol.decode(coord.handle(b"id", beat, now=0.1), SECRET, JOB).type == "restarted"


def test_two_coordinators_draw_different_incarnations():
    assert coordinator().incarnation != coordinator().incarnation

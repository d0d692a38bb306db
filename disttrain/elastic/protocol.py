"""The control-plane protocol: typed msgpack messages signed with the job secret.

A frame is msgpack([payload, mac]) where payload is msgpack of the message map and mac is
HMAC-SHA256(secret, payload). Every message carries the protocol version, its type, the job
id, the sender's generation, a random nonce, a timestamp and the coordinator incarnation it is
for (a random id each coordinator process draws, so that frames from before a restart mean
nothing to the new one; a worker's first join, which cannot know one, is the exception: see
docs/threat-model.md). Receivers refuse oversized,
malformed, unsigned, mis-signed, replayed, stale (or non-finite) and unknown messages with a
ProtocolError that names the reason. A frame that fails authentication gets no signed answer:
at most UNAUTHENTICATED, six constant bytes that say nothing about the job, and only to a frame
at least as long. Addresses have the form tcp://HOST:PORT (``check_address``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

VERSION = 4  # 2: views count joined and needed workers, leaves say whether the run finished, "finished" replies;
# 3: views carry the generation's store prefix; every message the coordinator incarnation it is for;
# 4: joins name the worker's node (a node of several processes is one worker), views may say "node_lost"
MAX_FRAME_BYTES = 64 * 1024
MAX_CLOCK_SKEW_S = 60.0
SECRET_ENV = "DISTTRAIN_SECRET"
UNAUTHENTICATED = msgpack.packb(["auth"])  # the whole answer to a frame that fails authentication

# Message type -> the body fields it must carry and their types.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "join": {
        "host": str, "pid": int, "config": str, "claim_gen": int, "claim_roster": list, "refresh_epoch": int,
        "node": str,  # the node this process is one of ("": a worker of one process)
        "local_rank": int,  # its place in the node
        "local_size": int,  # the node's processes
    },
    "heartbeat": {"step": int},
    "leave": {"step": int, "finished": bool, "digest": str},  # finished: this worker completed the job's last step
    "failed": {"step": int},
    "energy": {"step": int, "energy": float},
    "view": {
        "you": str,
        "gen": int,
        "roster": list,
        "store_port": int,
        "status": str,  # active, waiting, evicted, or node_lost (another process of this worker's node was lost)
        "last_break": int,
        "refresh_epoch": int,
        "joined": int,  # workers the next generation would hold
        "needed": int,  # workers it needs before it forms
        "store_prefix": str,  # where the generation's keys live in the rendezvous store: random, told only to members
    },
    "refused": {"reason": str},
    "restarted": {},  # the answer to a message for an earlier incarnation: talk to this one (its id is in the envelope)
    "finished": {"step": int, "digest": str},  # the answer to a join once the job is done
}


class ProtocolError(ValueError):
    """A message was refused; the text says why."""


class Unauthenticated(ProtocolError):
    """A frame refused before its signature could be verified, or because of it."""


class BadSignature(Unauthenticated):
    """A frame not signed with this job's secret."""


class JobMismatch(ProtocolError):
    """A correctly signed message names another job (``job``)."""

    def __init__(self, job: str, ours: str):
        super().__init__(f"message for job {job!r}, this is job {ours!r}")
        self.job = job


def join_body(
    config: str, *, claim_gen: int = 0, claim_roster: tuple[str, ...] | list[str] = (), refresh_epoch: int = 0,
    node: str = "", local_rank: int = 0, local_size: int = 1,
) -> dict[str, Any]:
    """A join's body from this process: its job config's fingerprint, a generation it claims to run
    (after a coordinator restart), and its node ("": a worker of one process)."""
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "config": config, "claim_gen": claim_gen,
        "claim_roster": list(claim_roster), "refresh_epoch": refresh_epoch,
        "node": node, "local_rank": local_rank, "local_size": local_size,
    }


def check_address(address: str, name: str = "coordinator address") -> tuple[str, int]:
    """(host, port) of an address of the form tcp://HOST:PORT; else a ValueError that names it."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{name} {address!r} is malformed: use tcp://HOST:PORT with PORT in 1-65535, e.g. tcp://10.0.0.5:29400")
    return host, int(port)


def short_id(worker_id: str) -> str:
    """A worker's name in logs: "w" and the first 4 characters of its id (messages carry the whole id)."""
    return "w" + worker_id[:4]


def load_secret(path: str | None = None) -> bytes:
    """The job secret from a file, or else from $DISTTRAIN_SECRET."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"job secret file {path!r} not found")
        secret = file.read_bytes().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if len(secret) < 16:
        raise ValueError(
            f"a job secret of at least 16 bytes is required: put one in a file passed with --secret-file, "
            f"or in ${SECRET_ENV} (e.g. `export {SECRET_ENV}=$(openssl rand -hex 32)`), the same on every node"
        )
    return secret


@dataclass
class Message:
    type: str
    job: str
    sender: str
    gen: int
    body: dict[str, Any]
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    ts: float = field(default_factory=time.time)
    incarnation: str = ""  # the coordinator process a worker's message is for ("" before it heard one)


def encode(message: Message, secret: bytes) -> bytes:
    payload = msgpack.packb(
        {
            "v": VERSION,
            "type": message.type,
            "job": message.job,
            "sender": message.sender,
            "gen": message.gen,
            "nonce": message.nonce,
            "ts": message.ts,
            "inc": message.incarnation,
            "body": message.body,
        },
        use_bin_type=True,
    )
    return msgpack.packb([payload, hmac.new(secret, payload, hashlib.sha256).digest()], use_bin_type=True)


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises many types on garbage
        raise ProtocolError(f"malformed frame: {type(error).__name__}") from None


def _has_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no int and an int is a float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _check_fields(values: dict, schema: dict[str, Any], where: str) -> None:
    for name, kind in schema.items():
        if name not in values:
            raise ProtocolError(f"{where} lacks field {name!r}")
        if not _has_type(values[name], kind):
            raise ProtocolError(f"{where} field {name!r} has type {type(values[name]).__name__}")
    extra = set(values) - set(schema)
    if extra:
        raise ProtocolError(f"{where} has unknown fields {sorted(extra)}")


_ENVELOPE = {"v": int, "type": str, "job": str, "sender": str, "gen": int, "nonce": bytes, "ts": float, "inc": str, "body": dict}


def decode(frame: bytes, secret: bytes, job: str) -> Message:
    """Verify and parse one frame; raises ProtocolError with the reason on anything wrong."""
    if not isinstance(frame, bytes) or len(frame) > MAX_FRAME_BYTES:
        raise Unauthenticated(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        outer = _unpack(frame)
    except ProtocolError as error:
        raise Unauthenticated(str(error)) from None
    if not (isinstance(outer, list) and len(outer) == 2 and all(isinstance(x, bytes) for x in outer)):
        raise Unauthenticated("malformed frame: expected [payload, mac]")
    payload, mac = outer
    if not hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).digest(), mac):
        raise BadSignature("bad signature: sender does not hold this job's secret")
    values = _unpack(payload)
    if not isinstance(values, dict):
        raise ProtocolError("malformed message: not a map")
    _check_fields(values, _ENVELOPE, "message")
    if values["v"] != VERSION:
        raise ProtocolError(f"protocol version {values['v']} is not {VERSION}: upgrade disttrain on every node")
    if values["type"] not in SCHEMAS:
        raise ProtocolError(f"unknown message type {values['type']!r}")
    _check_fields(values["body"], SCHEMAS[values["type"]], f"{values['type']} body")
    if values["job"] != job:
        raise JobMismatch(values["job"], job)
    if not math.isfinite(values["ts"]) or abs(time.time() - values["ts"]) > MAX_CLOCK_SKEW_S:
        raise ProtocolError("stale, future or non-finite timestamp: check the clocks (NTP) on both nodes")
    if len(values["nonce"]) != 16 or not values["sender"] or len(values["sender"]) > 128 or len(values["inc"]) > 64:
        raise ProtocolError("malformed nonce, sender or incarnation")
    return Message(
        values["type"], values["job"], values["sender"], values["gen"], values["body"], values["nonce"], values["ts"], values["inc"]
    )


class ReplayGuard:
    """Remembers recent nonces; a nonce seen twice while its message is within the clock-skew window
    is a replay. A nonce is kept until its message has gone stale, even one dated in the future."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check(self, message: Message) -> None:
        now = time.time()
        while self._seen and (len(self._seen) > self.capacity or next(iter(self._seen.values())) < now - 2 * MAX_CLOCK_SKEW_S):
            self._seen.popitem(last=False)
        if message.nonce in self._seen:
            raise ProtocolError("replayed message (nonce already seen)")
        self._seen[message.nonce] = max(now, message.ts)


"""The control-plane protocol: typed msgpack messages signed with the job secret.

A frame is msgpack([payload, mac]) where payload is msgpack of the message map and mac is
HMAC-SHA256(secret, payload). Every message carries the protocol version, its type, the job
id, the sender's generation, a random nonce and a timestamp. Receivers refuse oversized,
malformed, unsigned, mis-signed, replayed, stale and unknown messages with a ProtocolError
that names the reason. Addresses have the form tcp://HOST:PORT (``check_address``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

VERSION = 2  # 2: views count joined and needed workers, leaves say whether the run finished, "finished" replies
MAX_FRAME_BYTES = 64 * 1024
MAX_CLOCK_SKEW_S = 60.0
SECRET_ENV = "DISTTRAIN_SECRET"

# Message type -> the body fields it must carry and their types.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "join": {"host": str, "pid": int, "config": str, "claim_gen": int, "claim_roster": list, "refresh_epoch": int},
    "heartbeat": {"step": int},
    "leave": {"step": int, "finished": bool, "digest": str},  # finished: this worker completed the job's last step
    "failed": {"step": int},
    "energy": {"step": int, "energy": float},
    "view": {
        "you": str,
        "gen": int,
        "roster": list,
        "store_port": int,
        "status": str,
        "last_break": int,
        "refresh_epoch": int,
        "joined": int,  # workers the next generation would hold
        "needed": int,  # workers it needs before it forms
    },
    "refused": {"reason": str},
    "finished": {"step": int, "digest": str},  # the answer to a join once the job is done
}


class ProtocolError(ValueError):
    """A message was refused; the text says why."""


class BadSignature(ProtocolError):
    """A frame not signed with this job's secret."""


class JobMismatch(ProtocolError):
    """A correctly signed message names another job (``job``)."""

    def __init__(self, job: str, ours: str):
        super().__init__(f"message for job {job!r}, this is job {ours!r}")
        self.job = job


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


_ENVELOPE = {"v": int, "type": str, "job": str, "sender": str, "gen": int, "nonce": bytes, "ts": float, "body": dict}


def decode(frame: bytes, secret: bytes, job: str) -> Message:
    """Verify and parse one frame; raises ProtocolError with the reason on anything wrong."""
    if not isinstance(frame, bytes) or len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    outer = _unpack(frame)
    if not (isinstance(outer, list) and len(outer) == 2 and all(isinstance(x, bytes) for x in outer)):
        raise ProtocolError("malformed frame: expected [payload, mac]")
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
    if abs(time.time() - values["ts"]) > MAX_CLOCK_SKEW_S:
        raise ProtocolError("stale or future timestamp: check the clocks (NTP) on both nodes")
    if len(values["nonce"]) != 16 or not values["sender"] or len(values["sender"]) > 128:
        raise ProtocolError("malformed nonce or sender")
    return Message(values["type"], values["job"], values["sender"], values["gen"], values["body"], values["nonce"], values["ts"])


class ReplayGuard:
    """Remembers recent nonces; a nonce seen twice within the clock-skew window is a replay."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check(self, message: Message) -> None:
        now = time.time()
        while self._seen and (len(self._seen) > self.capacity or next(iter(self._seen.values())) < now - 2 * MAX_CLOCK_SKEW_S):
            self._seen.popitem(last=False)
        if message.nonce in self._seen:
            raise ProtocolError("replayed message (nonce already seen)")
        self._seen[message.nonce] = now


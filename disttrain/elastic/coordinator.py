"""The coordinator: membership, generations and the rendezvous store. Tensors never pass here.

One ROUTER socket. Workers send join, heartbeat, failed and leave messages; every reply is a
"view": the current generation, its roster (worker ids in rank order), the port of the c10d
TCPStore this process hosts, and the worker's status in it (active, waiting, evicted).

A generation changes when a roster member leaves, falls silent past the heartbeat timeout, or
when a failed collective is reported (then every member must confirm the failure or fall
silent for ``suspect_after_s``), and when new workers are waiting to join. Survivors keep
their order, so rank 0 stays rank 0 while it lives; joiners are appended.

A worker is one process, or a node of several (its processes name the same node in their
joins): a node enters a generation once all its processes have joined, its processes ranked
together in local-rank order, and it leaves as a unit: when one of its processes goes, the
others are told "node_lost". Worker counts (min, max, start) count nodes then.

A coordinator serves one job, ``CoordinatorConfig.job``: messages that name another job are
refused. The job has finished once a member that completed its last step leaves saying so:
from then on every join is answered "finished" (the step and parameter digest) instead of a
place in a generation. To run the job again, restart the coordinator.
"""

from __future__ import annotations

import errno
import logging
import secrets
import socket as pysocket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
import zmq

from disttrain.elastic import curve, protocol
from disttrain.elastic.protocol import Message, ProtocolError, ReplayGuard, Unauthenticated, short_id
from disttrain.elastic.throttle import Throttle

log = logging.getLogger(__name__)
COORDINATOR_ID = "coordinator"
WORKER_MESSAGES = ("join", "heartbeat", "failed", "leave", "energy")
_BIND_FIX = "pick another port, or an address of this machine, with --bind"
_STORE_ROLE = "the rendezvous store's port (the bind port + 1 unless --store-port is given)"
_STORE_FIX = "pass --store-port with a free port"


class PortError(ValueError):
    """A coordinator port is out of range or cannot be listened on; the text names it and what to do."""


def _unavailable(port: int, role: str, fix: str, reason: str | None) -> PortError:
    """The error for a port that cannot be listened on (``reason`` None: it is in use)."""
    if reason is None:
        return PortError(f"port {port}, {role}, is in use: stop whatever holds it (another coordinator?), or {fix}")
    return PortError(f"cannot listen on port {port}, {role}: {reason}; {fix}")


@dataclass(frozen=True)
class CoordinatorConfig:
    bind: str = "tcp://127.0.0.1:29400"
    job: str = "disttrain"
    min_workers: int = 1
    max_workers: int = 64
    start_workers: int = 0  # the first generation waits for this many (0: min_workers)
    heartbeat_timeout_s: float = 3.0
    suspect_after_s: float = 1.0
    join_grace_s: float = 0.5
    store_port: int = 0  # 0: the bind port + 1
    refresh: str = "fixed"  # "adaptive": also refresh SVD bases when captured energy drops
    energy_threshold: float = 0.5
    curve_keys: str = ""  # a folder of CURVE keys: encrypt the control plane ("": plain text)

    def validate(self) -> None:
        port = self.port  # refuses a malformed --bind
        if not 0 <= self.store_port <= 65535:
            raise PortError(f"--store-port {self.store_port} is out of range: give a port in 1-65535 (0: the bind port + 1)")
        if self.rendezvous_port > 65535:
            raise PortError(f"{_STORE_ROLE} would be {self.rendezvous_port}, out of range: {_STORE_FIX}, or bind a lower port")
        if self.rendezvous_port == port:
            raise PortError(f"--store-port {self.store_port} is the bind port: {_STORE_FIX}")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self.min_workers} and {self.max_workers}")
        if self.start_workers and not self.min_workers <= self.start_workers <= self.max_workers:
            raise ValueError(f"start_workers ({self.start_workers}) must lie between min_workers and max_workers")
        if self.refresh not in ("fixed", "adaptive"):
            raise ValueError(f"refresh must be 'fixed' or 'adaptive', got {self.refresh!r}")
        if not 0 < self.energy_threshold < 1:
            raise ValueError(f"energy_threshold must lie in (0, 1), got {self.energy_threshold}")
        if self.suspect_after_s >= self.heartbeat_timeout_s:
            raise ValueError("suspect_after_s must be shorter than heartbeat_timeout_s")

    @property
    def port(self) -> int:
        return protocol.check_address(self.bind, "--bind")[1]

    @property
    def host(self) -> str:
        """The address the coordinator listens on, and its rendezvous store too ("" for all: --bind tcp://*:PORT)."""
        host = protocol.check_address(self.bind, "--bind")[0]
        return "" if host in ("*", "0.0.0.0") else host.strip("[]")

    @property
    def rendezvous_port(self) -> int:
        """The rendezvous store's port: ``store_port``, or else the bind port + 1."""
        return self.store_port or self.port + 1


@dataclass
class Member:
    worker_id: str
    identity: bytes | None
    last_seen: float
    step: int = 0
    failed_gen: int = -1
    node: str = ""  # the node this process is one of ("": a worker of one process)
    local_rank: int = 0
    local_size: int = 1

    @property
    def unit(self) -> str:
        """The worker this process is part of: its node, or itself."""
        return self.node or self.worker_id


def listening_socket(host: str, port: int) -> pysocket.socket:
    """A TCP socket listening on ``host`` ("" for every interface) and ``port``."""
    family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
    listener = pysocket.socket(family, pysocket.SOCK_STREAM)
    try:
        listener.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener


def host_store(host: str, port: int) -> dist.TCPStore:
    """The rendezvous store every generation's process group forms on, listening on ``host`` only
    (TCPStore alone would listen on every interface); PortError if the port is not free."""
    try:
        listener = listening_socket(host, port)
    except OSError as error:
        raise _unavailable(port, _STORE_ROLE, _STORE_FIX, None if error.errno == errno.EADDRINUSE else error.strerror) from None
    try:
        store = dist.TCPStore(
            host or "0.0.0.0", port, None, True, timeout=timedelta(seconds=60), wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )
    except RuntimeError as error:  # torch's DistNetworkError
        listener.close()
        raise _unavailable(port, _STORE_ROLE, _STORE_FIX, str(error).rpartition("message: ")[2]) from None
    listener.detach()  # the store owns the socket now, and closes it when it goes
    return store


class Coordinator:
    """Membership state machine; ``handle`` never raises, whatever arrives."""

    def __init__(self, config: CoordinatorConfig, secret: bytes):
        config.validate()
        self.config = config
        self.secret = secret
        self.curve = curve.coordinator_keys(config.curve_keys) if config.curve_keys else None  # (public, secret)
        self._store: dist.TCPStore | None = None  # hosted while serving
        self.replays = ReplayGuard()  # in memory only: a restart forgets it, and the incarnation takes over
        self.incarnation = secrets.token_hex(8)
        self.members: dict[str, Member] = {}
        self.node_lost: set[str] = set()  # processes removed because another process of their node went
        self.local_size: int | None = None  # processes per worker, set by the first join
        self.roster: list[str] = []
        self.gen = 0
        self.broken = False
        self.last_break = 0
        self.last_join = 0.0
        self.refusals = 0
        self._refusal_log = Throttle(log)
        self.finished: tuple[int, str] | None = None  # (step, parameter digest) once the job is done
        self.job_config: str | None = None  # the fingerprint every worker's config must match
        self.refresh_epoch = 0  # bumped to ask every worker for a fresh SVD basis
        # Where the current generation forms its process group in the rendezvous store: unguessable, and
        # told only to its members, so that a stranger who reaches the store cannot read or spoil it.
        self.store_prefix = ""
        self._refresh_step = -1

    # --- message handling -------------------------------------------------------------
    def handle(self, identity: bytes, frame: bytes, now: float | None = None) -> bytes | None:
        """The reply frame for one request frame: a signed one only to a sender that holds the secret
        (a frame that fails authentication gets UNAUTHENTICATED if it is no shorter, else nothing)."""
        now = time.monotonic() if now is None else now
        try:
            message = protocol.decode(frame, self.secret, self.config.job)
            self.replays.check(message)
            if message.type not in WORKER_MESSAGES:
                raise ProtocolError(f"workers may not send {message.type!r} messages")
            if message.incarnation != self.incarnation and not (message.incarnation == "" and message.type == "join"):
                # Sent to an earlier coordinator process (or replayed from before its restart): act on none of it.
                self._note_refusal("incarnation", f"answered a message for an earlier coordinator from {short_id(message.sender)}", now)
                return self._reply("restarted", {})
        except Unauthenticated as error:
            self._note_refusal(type(error).__name__, f"refused a message from peer {identity[:8].hex()}: {error}", now)
            return protocol.UNAUTHENTICATED if len(frame) >= len(protocol.UNAUTHENTICATED) else None
        except ProtocolError as error:
            self._note_refusal(type(error).__name__, f"refused a message from peer {identity[:8].hex()}: {error}", now)
            return self._reply("refused", {"reason": str(error)})
        if self.finished is not None and (message.type == "join" or message.sender in self._waiting()):
            return self._tell_finished(message.sender, *self.finished)
        if message.type == "join":
            if self.job_config not in (None, message.body["config"]):
                text = f"refused worker {short_id(message.sender)}: its config differs from the running job's"
                self._note_refusal("config", text, now)
                return self._reply(
                    "refused",
                    {"reason": "this worker's config differs from the running job's: start it with the same flags and config file"},
                )
            if (refusal := self._node_refusal(message)) is not None:
                self._note_refusal("node", f"refused worker {short_id(message.sender)}: {refusal}", now)
                return self._reply("refused", {"reason": refusal})
            self.job_config = message.body["config"]
            self.local_size = message.body["local_size"]
            self._on_join(identity, message, now)
        member = self.members.get(message.sender)
        if member is not None:
            member.identity, member.last_seen = identity, now
            if message.type == "heartbeat":
                member.step = message.body["step"]
            elif message.type == "failed":
                self._on_failed(member, message)
            elif message.type == "leave":
                self._on_leave(message)
            elif message.type == "energy":
                self._on_energy(message.body["step"], message.body["energy"])
        self.tick(now)
        return self._view_for(message.sender)

    def _on_join(self, identity: bytes, message: Message, now: float) -> None:
        sender, body = message.sender, message.body
        claim_gen, claim_roster = body["claim_gen"], body["claim_roster"]
        if claim_gen > self.gen and sender in claim_roster and all(isinstance(w, str) for w in claim_roster):
            # This coordinator restarted: adopt the generation the workers are still running.
            log.info("adopting generation %d (%d workers) reported by %s", claim_gen, len(claim_roster), short_id(sender))
            self.gen, self.roster, self.broken, self.last_break = claim_gen, list(claim_roster), False, 0
            self.refresh_epoch = max(self.refresh_epoch, body["refresh_epoch"])
            for worker in claim_roster:
                self.members.setdefault(worker, Member(worker, None, now))
        if sender not in self.members:
            log.info("worker %s (%s, pid %d) asks to join", short_id(sender), body["host"], body["pid"])
            self.members[sender] = Member(sender, identity, now)
            self.last_join = now
        member = self.members[sender]  # a claim names the node of a member adopted above
        member.node, member.local_rank, member.local_size = body["node"], body["local_rank"], body["local_size"]

    def _node_refusal(self, message: Message) -> str | None:
        """Why a join cannot be admitted as part of a node (None: it can)."""
        body = message.body
        size, local_rank = body["local_size"], body["local_rank"]
        if self.local_size is not None and size != self.local_size and message.sender not in self.members:
            return (
                f"this worker has {size} process(es) per node and the job's workers have {self.local_size}: "
                "start every node with the same --nproc-per-node (and the same --inner)"
            )
        if not 0 <= local_rank < size or (size > 1) != bool(body["node"]):
            return f"local rank {local_rank} of a node of {size} processes (node {body['node']!r}) is no place in a node"
        taken = [
            m for m in self.members.values()
            if body["node"] and m.node == body["node"] and m.local_rank == local_rank and m.worker_id != message.sender
        ]
        if taken:
            return f"another process of node {body['node']} holds local rank {local_rank}: give each process of a node its own LOCAL_RANK"
        return None

    def _on_failed(self, member: Member, message: Message) -> None:
        if message.gen != self.gen or member.worker_id not in self.roster:
            return  # a report about an older generation: that one is already replaced
        member.failed_gen = message.gen
        if not self.broken:
            log.info(
                "generation %d broken: %s reports a failed collective at step %d",
                self.gen, short_id(member.worker_id), message.body["step"],
            )
        self._break()

    def _on_energy(self, step: int, energy: float) -> None:
        """The adaptive schedule: a basis that captures too little of the gradient is replaced."""
        if self.config.refresh == "adaptive" and energy < self.config.energy_threshold and step > self._refresh_step:
            self.refresh_epoch += 1
            self._refresh_step = step
            log.info("captured energy %.3f < %.3f at step %d: refresh %d requested", energy, self.config.energy_threshold, step, self.refresh_epoch)

    def _on_leave(self, message: Message) -> None:
        body = message.body
        if body["finished"] and self.finished is None and message.sender in self.roster:
            self.finished = (body["step"], body["digest"])
            log.info(
                "job %r finished at step %d (parameter digest %s): workers that join from now on are told so",
                self.config.job, body["step"], body["digest"] or "not reported",
            )
        self._remove(message.sender, "left")

    def _tell_finished(self, worker_id: str, step: int, digest: str) -> bytes:
        """The answer to a worker that joins, or still waits to, once the job has finished."""
        self.members.pop(worker_id, None)
        log.info("told worker %s that the job finished at step %d", short_id(worker_id), step)
        return self._reply("finished", {"step": step, "digest": digest})

    def _note_refusal(self, kind: str, text: str, now: float) -> None:
        """Count a refused message and log it, a flood of like ones as one line per window."""
        self.refusals += 1
        self._refusal_log.warning(kind, text, now)

    def _remove(self, worker_id: str, why: str) -> None:
        member = self.members.pop(worker_id, None)
        if member is not None and member.node and self.finished is None:
            for mate in [w for w, m in self.members.items() if m.node == member.node]:
                self._lose_with_node(mate, f"of node {member.node}, whose process {short_id(worker_id)} {why}")
        if worker_id not in self.roster:
            return
        if self.finished is not None:
            log.info("worker %s %s (run finished)", short_id(worker_id), why)
        else:
            log.info("worker %s %s; generation %d must be replaced", short_id(worker_id), why, self.gen)
            self._break()

    def _lose_with_node(self, worker_id: str, why: str) -> None:
        """A process whose node went: out of the job, told so at its next message."""
        self.members.pop(worker_id, None)
        self.node_lost.add(worker_id)
        log.info("worker %s leaves with its node (%s)", short_id(worker_id), why)
        if worker_id in self.roster and self.finished is None:
            self._break()

    def _break(self) -> None:
        """The current generation can no longer complete a collective: its members must regroup."""
        self.broken = True
        self.last_break = self.gen

    # --- the state machine ------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Time-outs, failure resolution and new generations."""
        now = time.monotonic() if now is None else now
        self._refusal_log.flush(now)
        for worker_id, member in list(self.members.items()):
            if worker_id in self.members and now - member.last_seen > self.config.heartbeat_timeout_s:
                self._remove(worker_id, f"silent for {now - member.last_seen:.1f} s")
        if self.broken:
            for worker_id in self.roster:
                member = self.members.get(worker_id)
                if member and member.failed_gen != self.gen and now - member.last_seen > self.config.suspect_after_s:
                    self._remove(worker_id, "silent after a failed collective")
            unresolved = [w for w in self.roster if w in self.members and self.members[w].failed_gen != self.gen]
            if not unresolved:
                self._new_generation(now)
        elif self._waiting() and len(self._candidate_units()) >= self._needed() and self._candidates() != self.roster:
            # A waiting worker that does not fit (the roster is at max_workers) changes nothing.
            if now - self.last_join >= self.config.join_grace_s or len(self._candidate_units()) >= self.config.max_workers:
                self._new_generation(now)

    def _waiting(self) -> list[str]:
        return [w for w in self.members if w not in self.roster]

    def _units(self, workers: list[str]) -> list[list[str]]:
        """``workers`` as workers of the exchange: each node's processes together, by local rank, in order of first appearance."""
        units: dict[str, list[str]] = {}
        for worker_id in workers:
            units.setdefault(self.members[worker_id].unit, []).append(worker_id)
        return [sorted(unit, key=lambda w: self.members[w].local_rank) for unit in units.values()]

    def _complete(self, unit: list[str]) -> bool:
        return len(unit) == self.members[unit[0]].local_size

    def _candidate_units(self) -> list[list[str]]:
        """The next generation's workers: the survivors, then whole nodes (or single processes) that wait."""
        survivors = [w for w in self.roster if w in self.members]
        return [u for u in self._units(survivors + self._waiting()) if self._complete(u)][: self.config.max_workers]

    def _candidates(self) -> list[str]:
        return [worker_id for unit in self._candidate_units() for worker_id in unit]

    def _needed(self) -> int:
        """Workers the next generation needs: the first waits for start_workers."""
        return self.config.min_workers if self.gen else self.config.start_workers or self.config.min_workers

    def _new_generation(self, now: float) -> None:
        for unit in self._units([w for w in self.roster if w in self.members]):
            if not self._complete(unit):  # a node whose lost process the coordinator never heard of by name
                for worker_id in unit:
                    self._lose_with_node(worker_id, f"of node {self.members[unit[0]].node}, which is incomplete")
        units = self._candidate_units()
        if len(units) < self.config.min_workers:
            return  # below quorum: wait for joiners
        self.gen += 1
        self.roster = [worker_id for unit in units for worker_id in unit]
        self.broken = False
        self.store_prefix = secrets.token_hex(16)
        processes = f" of {len(self.roster) // len(units)} processes" if len(self.roster) > len(units) else ""
        log.info("generation %d: %d workers%s (%s)", self.gen, len(units), processes, ", ".join(map(short_id, self.roster)))

    # --- replies ----------------------------------------------------------------------
    def status_of(self, worker_id: str) -> str:
        if worker_id in self.node_lost:
            return "node_lost"
        if worker_id not in self.members:
            return "evicted"
        return "active" if worker_id in self.roster and not self.broken else "waiting"

    def _view_for(self, worker_id: str) -> bytes:
        body = {
            "you": worker_id,
            "gen": self.gen,
            "roster": list(self.roster),
            "store_port": self.config.rendezvous_port,
            "status": self.status_of(worker_id),
            "last_break": self.last_break,
            "refresh_epoch": self.refresh_epoch,
            "joined": len(self._candidate_units()),
            "needed": self._needed(),
            "store_prefix": self.store_prefix if worker_id in self.roster else "",
        }
        return self._reply("view", body)

    def _reply(self, kind: str, body: dict) -> bytes:
        message = Message(kind, self.config.job, COORDINATOR_ID, self.gen, body, incarnation=self.incarnation)
        return protocol.encode(message, self.secret)

    # --- serving ----------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None, tick_s: float = 0.05) -> None:
        """Host the rendezvous store and answer workers until ``stop`` is set; PortError if a port is not free."""
        stop = stop or threading.Event()
        socket = self._listen()
        config = self.config
        log.info(
            "coordinator for job %r on %s, rendezvous store on port %d, control plane %s", config.job, config.bind,
            config.rendezvous_port, "encrypted (CURVE)" if self.curve else "signed, not encrypted",
        )
        try:
            while not stop.is_set():
                if socket.poll(int(tick_s * 1000)):
                    parts = socket.recv_multipart()
                    if len(parts) != 2:
                        self._note_refusal("frames", f"refused a message of {len(parts) - 1} frames", time.monotonic())
                        continue
                    answer = self.handle(parts[0], parts[1])
                    if answer is not None:
                        socket.send_multipart([parts[0], answer])
                else:
                    self.tick()
        finally:
            socket.close(0)
            self._store = None  # the store's server stops with its last reference, and closes its socket

    def _listen(self) -> zmq.Socket:
        """Host the rendezvous store, then bind the coordinator's socket (a store that fails lets go at once)."""
        config = self.config
        self._store = host_store(config.host, config.rendezvous_port)
        socket = zmq.Context.instance().socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES + 1024)
        if self.curve is not None:
            curve.serve_encrypted(socket, self.curve)
        try:
            socket.bind(config.bind)
        except zmq.ZMQError as error:
            socket.close(0)
            self._store = None
            reason = None if error.errno == zmq.EADDRINUSE else zmq.strerror(error.errno)
            raise _unavailable(config.port, f"the coordinator's port (--bind {config.bind})", _BIND_FIX, reason) from None
        return socket

"""The worker side of the control plane: join, heartbeats, and the latest view of the job.

A background thread owns the DEALER socket (zmq sockets are not thread-safe): it sends a
heartbeat every ``heartbeat_s``, sends what the training thread queued (failure reports,
leave), and keeps the newest view. While the coordinator is unreachable the thread keeps
trying; the training thread goes on in its current group. A wait for a view says every few
seconds what it waits for; until the coordinator has answered once, it gives up after
``connect_timeout_s``, naming what came back instead (nothing, frames under another secret, a
coordinator of another job).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import zmq

from disttrain.elastic import curve, protocol
from disttrain.elastic.node import NodeIdentity
from disttrain.elastic.protocol import BadSignature, JobMismatch, Message, ProtocolError, short_id
from disttrain.elastic.throttle import Throttle

log = logging.getLogger(__name__)
REPORT_EVERY_S = 5.0  # how often a wait for a view says what it waits for


@dataclass(frozen=True)
class View:
    """What the coordinator last said about the job and this worker."""

    gen: int
    roster: tuple[str, ...]
    store_port: int
    status: str
    last_break: int
    refresh_epoch: int
    joined: int  # workers the next generation would hold
    needed: int  # workers it needs before it forms
    store_prefix: str  # the generation's keys in the rendezvous store
    received_at: float = field(default_factory=time.monotonic)

    def rank_of(self, worker_id: str) -> int | None:
        return self.roster.index(worker_id) if worker_id in self.roster else None


def _joined(view: View) -> str:
    """How far the next generation is from its quorum."""
    if view.joined < view.needed:
        return f"{view.joined} of {view.needed} workers have joined"
    return f"{view.joined} workers have joined ({view.needed} needed)"


class CoordinatorUnreachable(TimeoutError):
    """No usable answer from the coordinator in time; the text says what came back instead."""


class GenerationTimeout(TimeoutError):
    """The coordinator answers, but no generation took this worker in time."""


class WorkerRefused(ValueError):
    """The coordinator will not admit this worker; the text says why."""


class JobFinished(Exception):
    """The job finished before this worker was admitted: there is nothing left to train."""

    def __init__(self, job: str, step: int, digest: str):
        digest_note = f" (parameter digest {digest})" if digest else ""
        super().__init__(f"job {job!r} already finished at step {step}{digest_note}: this worker has nothing to do")
        self.step = step
        self.digest = digest


class Agent:
    """Talks to the coordinator for one training process."""

    def __init__(
        self, address: str, secret: bytes, job: str, config: str, heartbeat_s: float = 0.25, connect_timeout_s: float = 60.0,
        coordinator_key: bytes | None = None, node: NodeIdentity = NodeIdentity(),
    ):
        self.host, self.port = protocol.check_address(address)
        self.node = node  # the node this process is one of, as a worker of several processes
        self.address = address
        self.secret = secret
        self.job = job
        self.config = config
        self.refused: str | None = None
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.coordinator_key = coordinator_key  # the coordinator's CURVE public key (None: plain text)
        self.worker_id = uuid.uuid4().hex
        self.step = 0
        self.refresh_epoch = 0  # the last basis refresh this worker applied
        self.gen = 0
        self.roster: tuple[str, ...] = ()
        self._claim = False
        self._joined_id: str | None = None
        self._view: View | None = None
        self._abandoned: tuple[int, int] | None = None  # (generation, step) this worker reported failed
        self.incarnation = ""  # the coordinator process this worker talks to, as its answers say
        self._answered = False  # a message of this job came back: the connect timeout is over
        self._problem: str | None = None  # why the latest answer was unusable
        self._warnings = Throttle(log)
        self._job_finished: tuple[int, str] | None = None  # (step, digest): the coordinator says the job is done
        self._completed: tuple[int, str] | None = None  # (step, digest): this worker completed the job's last step
        self._changed = threading.Condition()
        self._outbox: queue.Queue[tuple[str, str, dict]] = queue.Queue()
        # Guards the worker id: switching it, signing with it, and accepting views addressed to it.
        self._id_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disttrain-agent", daemon=True)

    # --- the training thread's API ----------------------------------------------------
    @property
    def name(self) -> str:
        """This worker's short name in logs (it changes on rejoin, with the id)."""
        return short_id(self.worker_id)

    def start(self) -> None:
        self._send("join", self._join_body())
        self._thread.start()

    def rejoin(self) -> None:
        """Join again as a new worker: whatever this process held is stale."""
        with self._id_lock:
            self.worker_id = uuid.uuid4().hex
            self.gen, self.roster, self._claim, self._joined_id = 0, (), False, None
            with self._changed:
                self._view = None
            self._send("join", self._join_body())

    def report_failure(self, step: int) -> None:
        """This worker abandons its generation. The report is sent again with every view that shows
        the coordinator still running that generation: one sent to a coordinator that then died, or
        before it restarted, would otherwise be lost, and the new one would wait for it forever."""
        with self._id_lock:
            self._abandoned = (self.gen, step)
        self._send("failed", {"step": step})

    def report_energy(self, step: int, energy: float) -> None:
        """The share of the gradient's energy the current bases capture (for adaptive refresh)."""
        self._send("energy", {"step": step, "energy": float(energy)})

    def mark_finished(self, step: int, digest: str) -> None:
        """This worker completed the job's last step: its leave tells the coordinator so."""
        self._completed = (step, digest)

    def leave(self) -> None:
        step, digest = self._completed or (self.step, "")
        self._send("leave", {"step": step, "finished": self._completed is not None, "digest": digest})

    def stop(self, leave: bool = True) -> None:
        """Leave the job (when asked) and stop heartbeating; a second call, or one before start(), does nothing."""
        if self._stop.is_set() or not self._thread.is_alive():
            return
        if leave:
            self.leave()
            time.sleep(2 * self.heartbeat_s)
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def view(self) -> View | None:
        return self._view

    def entered(self, view: View) -> None:
        """The training thread now runs ``view``'s generation."""
        self.gen, self.roster = view.gen, view.roster

    def generation_broken(self) -> bool:
        """True when the coordinator says this worker's current generation cannot finish."""
        view = self._view
        return view is not None and (view.last_break >= self.gen or view.status in ("evicted", "node_lost"))

    def wait_for_view(self, accept: Callable[[View], bool], timeout_s: float) -> View:
        """Block until a view satisfies ``accept(view)``, saying every few seconds what it waits for.

        Raises WorkerRefused or JobFinished when the coordinator says so; CoordinatorUnreachable
        when no usable answer came within ``connect_timeout_s`` (before the coordinator's first
        answer) or ``timeout_s``; GenerationTimeout when it answers but no view was accepted
        within ``timeout_s``.
        """
        started = time.monotonic()
        next_report = started + REPORT_EVERY_S
        with self._changed:
            while True:
                if self.refused is not None:
                    raise WorkerRefused(self.refused)
                if self._job_finished is not None:
                    raise JobFinished(self.job, *self._job_finished)
                view, now = self._view, time.monotonic()
                if view is not None and accept(view):
                    return view
                limit = timeout_s if self._answered else min(timeout_s, self.connect_timeout_s)
                if now - started >= limit:
                    raise self._timeout(view, now, limit)
                if now >= next_report:
                    log.info("%s (giving up in %.0f s)", self._waiting_for(view, now, started), started + limit - now)
                    next_report += REPORT_EVERY_S
                self._changed.wait(min(next_report, started + limit) - now)

    def _answering(self, view: View, now: float) -> bool:
        return now - view.received_at < self._silent_s

    def _waiting_for(self, view: View | None, now: float, started: float) -> str:
        """What a wait for a view waits for: a quorum, a generation, or an answer."""
        if view is not None and self._answering(view, now):
            return f"waiting for generation {view.gen + 1}: {_joined(view)}"
        silent_since = max(started, view.received_at) if view is not None else started
        return f"waiting for the coordinator at {self.address}: no usable answer for {now - silent_since:.0f} s"

    def _timeout(self, view: View | None, now: float, limit: float) -> TimeoutError:
        if view is not None and self._answering(view, now):
            return GenerationTimeout(
                f"the coordinator at {self.address} formed no generation with this worker within {limit:.0f} s: {_joined(view)}"
            )
        nothing = f"nothing answered (is `disttrain coordinator` running there, with TCP port {self.port} open to this node?"
        if self.coordinator_key is None:
            nothing += " If it runs with --curve-keys, give this worker --coordinator-key)"
        else:
            nothing += " With --coordinator-key the coordinator must run with --curve-keys, and the key be its coordinator.key)"
        problem = self._problem or nothing
        return CoordinatorUnreachable(f"no usable answer from the coordinator at {self.address} in {limit:.0f} s: {problem}")

    # --- the agent thread --------------------------------------------------------------
    def _join_body(self) -> dict:
        return protocol.join_body(
            self.config, claim_gen=self.gen if self._claim else 0, claim_roster=self.roster if self._claim else (),
            refresh_epoch=self.refresh_epoch, **self.node.join_fields(),
        )

    def _send(self, kind: str, body: dict) -> None:
        self._outbox.put((self.worker_id, kind, body))

    def _message(self, sender: str, kind: str, body: dict) -> bytes:
        if kind == "join":
            self._joined_id = sender
        return protocol.encode(Message(kind, self.job, sender, self.gen, body, incarnation=self.incarnation), self.secret)

    def _heartbeat(self) -> bytes | None:
        """A heartbeat, unless this id's join has not gone out yet (it would read as evicted)."""
        with self._id_lock:
            if self._joined_id != self.worker_id:
                return None
            return self._message(self.worker_id, "heartbeat", {"step": self.step})

    def _connect(self, context: zmq.Context) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES + 1024)
        if self.coordinator_key is not None:
            curve.connect_encrypted(sock, self.coordinator_key)
        sock.connect(self.address)
        return sock

    @property
    def _silent_s(self) -> float:
        """No answer for this long: the coordinator is not answering (and the socket is renewed)."""
        return 4 * self.heartbeat_s

    def _run(self) -> None:
        context = zmq.Context.instance()
        sock = self._connect(context)
        last_reply = time.monotonic()
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while not self._outbox.empty():
                    sock.send(self._message(*self._outbox.get_nowait()))
                if now >= next_beat:
                    beat = self._heartbeat()
                    if beat is not None:
                        sock.send(beat)
                        next_beat = now + self.heartbeat_s
                if sock.poll(int(self.heartbeat_s * 1000 / 2)):
                    self._receive(sock.recv())
                    last_reply = time.monotonic()
                elif time.monotonic() - last_reply > self._silent_s:
                    # Reconnect with a fresh socket so queued heartbeats to a dead peer are dropped.
                    sock.close(0)
                    sock = self._connect(context)
                    last_reply = time.monotonic()
                self._warnings.flush()
        finally:
            sock.close(0)

    def _refuse(self, reason: str) -> None:
        log.error("the coordinator refused this worker: %s", reason)
        with self._changed:
            self.refused = reason
            self._changed.notify_all()

    def _unusable(self, error: ProtocolError) -> None:
        """Note an answer this worker cannot use and why: logged at once, a flood of them summarised."""
        if isinstance(error, JobMismatch):
            problem = f"a coordinator of job {error.job!r} answered, this worker is for job {self.job!r}: give both the same --job"
        elif isinstance(error, BadSignature):
            problem = (
                "something answered, but messages between it and this worker fail authentication: it holds "
                f"another secret; check the secret file / ${protocol.SECRET_ENV}"
            )
        else:
            problem = f"its answer was refused here: {error}"
        self._warnings.warning(type(error).__name__, f"unusable answer from {self.address}: {problem}")
        with self._changed:
            self._problem = problem

    def _receive(self, frame: bytes) -> None:
        if frame == protocol.UNAUTHENTICATED:
            self._unusable(BadSignature("the coordinator says this worker's frames fail authentication"))
            return
        try:
            message = protocol.decode(frame, self.secret, self.job)
        except ProtocolError as error:
            self._unusable(error)
            return
        with self._changed:
            self._answered, self._problem = True, None
        if message.incarnation != self.incarnation:
            if self.incarnation:
                log.info("the coordinator restarted (incarnation %s, before %s): talking to the new one", message.incarnation, self.incarnation)
            self.incarnation = message.incarnation
        if message.type == "refused":
            self._refuse(message.body["reason"])
        elif message.type == "finished":
            with self._changed:
                self._job_finished = (message.body["step"], message.body["digest"])
                self._changed.notify_all()
        elif message.type == "view":
            with self._id_lock:
                if message.body["you"] == self.worker_id:  # else: an answer to this worker's previous id
                    self._accept(message.body)

    def _accept(self, body: dict) -> None:
        """Take a view addressed to this worker (called with the id lock held)."""
        view = View(
            body["gen"], tuple(body["roster"]), body["store_port"], body["status"], body["last_break"], body["refresh_epoch"],
            body["joined"], body["needed"], body["store_prefix"],
        )
        if view.status == "evicted" and self.gen > 0 and not self._claim and view.gen < self.gen:
            # The coordinator restarted and forgot us: re-register, claiming our running generation.
            self._claim = True
            self._send("join", self._join_body())
            return
        if view.status != "evicted":
            self._claim = False
        if self._abandoned is not None and self._abandoned[0] == self.gen == view.gen and view.status != "evicted":
            self._send("failed", {"step": self._abandoned[1]})
        with self._changed:
            self._view = view
            self._changed.notify_all()

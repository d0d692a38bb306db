"""The worker side of the control plane: join, heartbeats, and the latest view of the job.

A background thread owns the DEALER socket (zmq sockets are not thread-safe): it sends a
heartbeat every ``heartbeat_s``, sends what the training thread queued (failure reports,
leave), and keeps the newest view. While the coordinator is unreachable the thread keeps
trying; the training thread goes on in its current group.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import zmq

from disttrain.elastic import protocol
from disttrain.elastic.protocol import Message, ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """What the coordinator last said about the job and this worker."""

    gen: int
    roster: tuple[str, ...]
    store_port: int
    status: str
    last_break: int
    refresh_epoch: int
    received_at: float = field(default_factory=time.monotonic)

    def rank_of(self, worker_id: str) -> int | None:
        return self.roster.index(worker_id) if worker_id in self.roster else None


class CoordinatorUnreachable(TimeoutError):
    """No view arrived in time."""


class WorkerRefused(ValueError):
    """The coordinator will not admit this worker; the text says why."""


class Agent:
    """Talks to the coordinator for one training process."""

    def __init__(self, address: str, secret: bytes, job: str, config: str, heartbeat_s: float = 0.25):
        self.address = address
        self.host = address.rsplit(":", 1)[0].removeprefix("tcp://")
        self.secret = secret
        self.job = job
        self.config = config
        self.refused: str | None = None
        self.heartbeat_s = heartbeat_s
        self.worker_id = uuid.uuid4().hex
        self.step = 0
        self.refresh_epoch = 0  # the last basis refresh this worker applied
        self.gen = 0
        self.roster: tuple[str, ...] = ()
        self._claim = False
        self._joined_id: str | None = None
        self._view: View | None = None
        self._changed = threading.Condition()
        self._outbox: queue.Queue[tuple[str, str, dict]] = queue.Queue()
        # Guards the worker id: switching it, signing with it, and accepting views addressed to it.
        self._id_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disttrain-agent", daemon=True)

    # --- the training thread's API ----------------------------------------------------
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
        self._send("failed", {"step": step})

    def report_energy(self, step: int, energy: float) -> None:
        """The share of the gradient's energy the current bases capture (for adaptive refresh)."""
        self._send("energy", {"step": step, "energy": float(energy)})

    def leave(self) -> None:
        self._send("leave", {})

    def stop(self, leave: bool = True) -> None:
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
        return view is not None and (view.last_break >= self.gen or view.status == "evicted")

    def wait_for_view(self, accept: Callable[[View], bool], timeout_s: float) -> View:
        """Block until a view satisfies ``accept(view)``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._view is None or not accept(self._view):
                if self.refused is not None:
                    raise WorkerRefused(self.refused)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CoordinatorUnreachable(
                        f"no usable answer from the coordinator at {self.address} within {timeout_s:.0f} s"
                    )
                self._changed.wait(remaining)
            return self._view

    # --- the agent thread --------------------------------------------------------------
    def _join_body(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "config": self.config,
            "claim_gen": self.gen if self._claim else 0,
            "claim_roster": list(self.roster) if self._claim else [],
            "refresh_epoch": self.refresh_epoch,
        }

    def _send(self, kind: str, body: dict) -> None:
        self._outbox.put((self.worker_id, kind, body))

    def _message(self, sender: str, kind: str, body: dict) -> bytes:
        if kind == "join":
            self._joined_id = sender
        return protocol.encode(Message(kind, self.job, sender, self.gen, body), self.secret)

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
        sock.connect(self.address)
        return sock

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
                elif time.monotonic() - last_reply > 4 * self.heartbeat_s:
                    # Reconnect with a fresh socket so queued heartbeats to a dead peer are dropped.
                    sock.close(0)
                    sock = self._connect(context)
                    last_reply = time.monotonic()
        finally:
            sock.close(0)

    def _refuse(self, reason: str) -> None:
        log.error("the coordinator refused this worker: %s", reason)
        with self._changed:
            self.refused = reason
            self._changed.notify_all()

    def _receive(self, frame: bytes) -> None:
        try:
            message = protocol.decode(frame, self.secret, self.job)
        except ProtocolError as error:
            if "bad signature" in str(error):
                self._refuse("the coordinator signs with another secret: give this worker the job's secret")
            log.warning("ignored a coordinator message: %s", error)
            return
        if message.type == "refused":
            self._refuse(message.body["reason"])
            return
        if message.type == "view":
            with self._id_lock:
                if message.body["you"] == self.worker_id:  # else: an answer to this worker's previous id
                    self._accept(message.body)

    def _accept(self, body: dict) -> None:
        """Take a view addressed to this worker (called with the id lock held)."""
        view = View(
            body["gen"], tuple(body["roster"]), body["store_port"], body["status"], body["last_break"], body["refresh_epoch"]
        )
        if view.status == "evicted" and self.gen > 0 and not self._claim and view.gen < self.gen:
            # The coordinator restarted and forgot us: re-register, claiming our running generation.
            self._claim = True
            self._send("join", self._join_body())
            return
        if view.status != "evicted":
            self._claim = False
        with self._changed:
            self._view = view
            self._changed.notify_all()

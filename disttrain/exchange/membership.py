"""Who trains together in a Session: the process group torchrun formed, or generations a coordinator forms.

A Session asks its membership to enter (a process group exists from then on), to start (every
member from rank 0's weights, before the exchange exists), to agree (every member holds
the same state), to switch to a newer generation at the start of a step where the exchange
allows, to run collective work so that a failed one is redone from its start in the next
generation, to take note of every committed step, and to finish.

Every member, a joiner included, must issue the same collectives in the same order. So all
collective work between steps runs where a joiner would run it too: at the start of a step
(the replica check, the generation switch, then the step) or, for a loop's own periodic work
(the trainer's evaluations and checkpoints), at the top of its loop, decided by state that a
joiner receives with the rest of its donor's (registered state). A failed piece of work is
redone from its start after the regroup, which is where a joiner starts too. ``FixedGroup`` does nothing of the
elastic kind; ``ElasticGroup`` forms every generation through a ``disttrain coordinator`` and
hands a joiner the state of a donor, so that the user's loop never sees a member come or go.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from disttrain.comm.layout import Inner, Layout
from disttrain.comm.waiting import abort_waits_when, wait_work
from disttrain.elastic.agent import Agent
from disttrain.elastic.curve import resolve_coordinator_key
from disttrain.elastic.membership import ElasticConfig, ElasticMembership
from disttrain.elastic.node import NodeIdentity, node_identity
from disttrain.elastic.protocol import load_secret
from disttrain.elastic.transfer import synchronise
from disttrain.exchange.base import Exchange
from disttrain.train.replica import start_from_rank0

log = logging.getLogger(__name__)

COORDINATOR_ENV = "DISTTRAIN_COORDINATOR"
MAX_CONSECUTIVE_FAILURES = 5


class Replica(Protocol):
    """What a membership needs of the Session it keeps in step with the others."""

    steps: int
    exchange: Exchange
    layout: Layout

    def replica_digest(self) -> bytes: ...

    def export_replica(self) -> dict[str, Any]: ...

    def load_replica(self, state: dict[str, Any]) -> None: ...

    def check_if_due(self) -> None:
        """The replica check, if one is due and the replicas agree (collective)."""


T = TypeVar("T")


class Membership(Protocol):
    elastic: bool

    def enter(self) -> None:
        """Take part in a process group (before the layout and the exchange are built on it)."""

    def start(self, start: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        """``start`` (the model's parameters and buffers, or what this process holds of them) begins
        as rank 0's of ``group`` (before the exchange is built)."""

    def agree(self, replica: Replica) -> None:
        """Bring every member to the same state (after the exchange is built)."""

    def settle(self, replica: Replica) -> None:
        """Between two steps (and once a session is made): the replica check when due, then, where the
        exchange allows, a move to a newer generation if any member heard of one (collective)."""

    def step_committed(self, replica: Replica) -> None:
        """After a committed step: tell the coordinator."""

    def run(self, attempt: Callable[[], T], replica: Replica) -> T | None:
        """``attempt()`` (collective work); under a coordinator a failed one is redone from its start
        in the next generation, and None is returned if that generation brought a donor's later state."""

    def finish(self, replica: Replica) -> None:
        """The run is over: tell the coordinator, leave."""


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a disttrain Session needs an initialised torch.distributed process group: launch your script "
            "with torchrun (torchrun --nproc-per-node 2 train.py) and call "
            "torch.distributed.init_process_group('gloo') (or 'nccl') before creating it, or give the "
            f"Session coordinator='tcp://HOST:PORT' (or set ${COORDINATOR_ENV}) to join an elastic job"
        )


class FixedGroup:
    """The process group the user formed (torchrun), unchanged for the whole run."""

    elastic = False

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def enter(self) -> None:
        _require_process_group()

    def start(self, start: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        """Every rank starts from rank 0's parameters and buffers (sent only where they differ)."""
        start_from_rank0(start, group)

    def agree(self, replica: Replica) -> None:
        pass  # join() copied rank 0's weights already

    def settle(self, replica: Replica) -> None:
        replica.check_if_due()

    def step_committed(self, replica: Replica) -> None:
        pass

    def run(self, attempt: Callable[[], T], replica: Replica) -> T | None:
        return attempt()

    def finish(self, replica: Replica) -> None:
        pass


def model_fingerprint(model: torch.nn.Module, method: dict[str, Any], seed: int) -> str:
    """What every worker of an elastic job must share: the method's settings, the seed that keys the
    seeded bases, and the parameters' shapes."""
    shapes = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    return hashlib.sha256(repr((sorted(method.items()), seed, shapes)).encode()).hexdigest()[:16]


class ElasticGroup:
    """Generations formed by a ``disttrain coordinator``: joins, failures and joiners inside the Session."""

    elastic = True

    def __init__(self, membership: ElasticMembership):
        self.membership = membership

    @classmethod
    def connect(
        cls, address: str, job: str, secret: bytes, fingerprint: str, heartbeat_s: float = 0.25,
        connect_timeout_s: float = 60.0, config: ElasticConfig | None = None, coordinator_key: bytes | None = None,
        node: NodeIdentity = NodeIdentity(),
    ) -> ElasticGroup:
        """An agent for the coordinator at ``address`` (not started yet); ``coordinator_key``: its
        CURVE public key, when it encrypts the control plane; ``node``: the node this process is one of."""
        agent = Agent(address, secret, job, fingerprint, heartbeat_s, connect_timeout_s, coordinator_key, node)
        return cls(ElasticMembership(agent, config or ElasticConfig()))

    @property
    def agent(self) -> Agent:
        return self.membership.agent

    def enter(self) -> None:
        """Ask the coordinator for a place and wait until a generation holds this worker (a donor's state follows)."""
        log.info("asking the coordinator at %s to join job %r", self.agent.address, self.agent.job)
        self.agent.start()
        try:
            self.membership.enter()
        except BaseException:
            self.agent.stop(leave=False)  # JobFinished and refusals end this worker; the message says why
            raise

    def start(self, start: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        pass  # agree() brings every member a donor's state

    def agree(self, replica: Replica) -> None:
        try:
            self._synchronise(replica)
        except RuntimeError as error:
            self._failed(error, replica)

    def settle(self, replica: Replica) -> None:
        """After every regroup each member, a joiner included, settles once more from the start."""
        sync_every = self.membership.config.sync_every
        failures = 0
        while True:
            try:
                replica.check_if_due()
                while replica.exchange.membership_may_change(replica.steps, sync_every):
                    if not self.membership.switch_due(replica.steps, replica.exchange.reducer.request_refresh):
                        return
                    self._regroup(replica)
                return
            except RuntimeError as error:
                failures += 1
                if failures > MAX_CONSECUTIVE_FAILURES:
                    raise
                self._failed(error, replica)

    def step_committed(self, replica: Replica) -> None:
        agent, steps, sync_every = self.agent, replica.steps, self.membership.config.sync_every
        agent.step = steps
        if self.membership.awaiting_first_step:
            log.info("first step of generation %d committed (step %d)", agent.gen, steps)
            self.membership.awaiting_first_step = False
        reducer = replica.exchange.reducer
        if dist.get_rank() == 0:  # rank 0 measures the captured energy for the coordinator's refresh decisions
            if steps % sync_every == 0 and (energy := reducer.captured_energy()) is not None:
                agent.report_energy(steps, energy)
            reducer.measure_next_step((steps + 1) % sync_every == 0)

    def run(self, attempt: Callable[[], T], replica: Replica) -> T | None:
        failures = 0
        step = replica.steps
        while True:
            try:
                return attempt()
            except RuntimeError as error:
                failures += 1
                if failures > MAX_CONSECUTIVE_FAILURES:
                    raise
                self._failed(error, replica)
                self.settle(replica)  # as every member does after a regroup, a joiner admitted in it included
                if replica.steps != step:
                    return None  # a donor's later state, this work done, replaced this one

    def finish(self, replica: Replica) -> None:
        """Wait for every member to finish, then leave as a worker that completed the job."""
        try:
            wait_work(dist.barrier(async_op=True))
        except RuntimeError as error:
            log.warning("members finished apart (%s); training itself is complete", error)
        self.agent.mark_finished(replica.steps, replica.replica_digest().hex()[:16])
        abort_waits_when(None)
        self.agent.stop(leave=True)

    # --- generations --------------------------------------------------------------------
    def _failed(self, error: RuntimeError, replica: Replica) -> None:
        """Tell the coordinator, then enter the next generation and agree there."""
        log.warning("step %d failed (%s); regrouping", replica.steps, error)
        self.membership.report_failure(replica.steps)
        replica.exchange.generation_failed()  # after the report, which breaks the generation for every wait
        self._regroup(replica)

    def _regroup(self, replica: Replica) -> None:
        """Enter the next generation and bring every member to the same state."""
        while True:
            self.membership.enter()
            try:
                replica.layout.regroup()
                replica.exchange.regrouped()
                self._synchronise(replica)
                return
            except RuntimeError as error:
                log.warning("state transfer failed (%s); regrouping again", error)
                self.membership.report_failure(replica.steps)

    def _synchronise(self, replica: Replica) -> None:
        def export() -> dict[str, Any]:
            return {**replica.export_replica(), "refresh_epoch": self.agent.refresh_epoch}

        def load(state: dict[str, Any]) -> None:
            self.agent.refresh_epoch = state.pop("refresh_epoch")
            replica.load_replica(state)

        synchronise(replica.steps, self.membership.fresh, replica.replica_digest(), export, load, replica.layout.transfer_group)
        self.membership.fresh = False
        self.agent.step = replica.steps


def membership_for(
    group: dist.ProcessGroup | None, coordinator: str | None, job: str, secret_file: str | None, fingerprint: str,
    coordinator_key: str | None = None, inner: Inner = "auto",
) -> Membership:
    """FixedGroup, or ElasticGroup when a coordinator is named (or ``$DISTTRAIN_COORDINATOR`` is set);
    ``coordinator_key`` (or ``$DISTTRAIN_COORDINATOR_KEY``): its CURVE public key, a file or Z85 text;
    under a node ``inner`` mode this process joins as part of its node (torchrun's variables say which)."""
    address = coordinator or os.environ.get(COORDINATOR_ENV)
    if not address:
        return FixedGroup(group)
    if group is not None:
        raise ValueError("a Session under a coordinator trains in the generations it forms: give no group")
    public = resolve_coordinator_key(coordinator_key)
    return ElasticGroup.connect(
        address, job, load_secret(secret_file), fingerprint, coordinator_key=public, node=node_identity(inner)
    )

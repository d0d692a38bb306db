"""Who trains together in a Session: the process group torchrun formed, or generations a coordinator forms.

A Session asks its membership to join (before its exchange exists), to agree (every member holds
the same state), to check for a newer generation at round starts, to run an exchange so that a
failed one is redone in the next generation, and to finish. ``FixedGroup`` does nothing of the
elastic kind; ``ElasticGroup`` forms every generation through a ``disttrain coordinator`` and
hands a joiner the state of a donor, so that the user's loop never sees a member come or go.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from disttrain.comm.waiting import abort_waits_when, wait_work
from disttrain.elastic.agent import Agent
from disttrain.elastic.membership import ElasticConfig, ElasticMembership
from disttrain.elastic.protocol import load_secret
from disttrain.elastic.transfer import synchronise
from disttrain.train.replica import broadcast_from_rank0

log = logging.getLogger(__name__)

COORDINATOR_ENV = "DISTTRAIN_COORDINATOR"
MAX_CONSECUTIVE_FAILURES = 5


class Replica(Protocol):
    """What a membership needs of the Session it keeps in step with the others."""

    steps: int

    def replica_digest(self) -> bytes: ...

    def export_replica(self) -> dict[str, Any]: ...

    def load_replica(self, state: dict[str, Any]) -> None: ...

    def request_refresh(self) -> None: ...


class Membership(Protocol):
    elastic: bool

    def join(self, model: torch.nn.Module) -> None:
        """Take part in a process group (before the exchange is built on it)."""

    def agree(self, replica: Replica) -> None:
        """Bring every member to the same state (after the exchange is built)."""

    def round_start(self, replica: Replica) -> None:
        """Where replicas agree: move to a newer generation if one formed."""

    def exchange(self, attempt: Callable[[], bool], replica: Replica) -> bool:
        """Run ``attempt`` (an exchange); under a coordinator a failed one is redone in the next generation."""

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

    def join(self, model: torch.nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        _require_process_group()
        broadcast_from_rank0(model, group=self.group)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for buffer in model.buffers():
            dist.broadcast(buffer, src=src, group=self.group)

    def agree(self, replica: Replica) -> None:
        pass  # join() copied rank 0's weights already

    def round_start(self, replica: Replica) -> None:
        pass

    def exchange(self, attempt: Callable[[], bool], replica: Replica) -> bool:
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
        connect_timeout_s: float = 60.0, config: ElasticConfig | None = None,
    ) -> ElasticGroup:
        """An agent for the coordinator at ``address`` (not started yet)."""
        agent = Agent(address, secret, job, fingerprint, heartbeat_s, connect_timeout_s)
        return cls(ElasticMembership(agent, config or ElasticConfig()))

    @property
    def agent(self) -> Agent:
        return self.membership.agent

    def join(self, model: torch.nn.Module) -> None:
        """Ask the coordinator for a place and wait until a generation holds this worker."""
        log.info("asking the coordinator at %s to join job %r", self.agent.address, self.agent.job)
        self.agent.start()
        try:
            self.membership.enter()
        except BaseException:
            self.agent.stop(leave=False)  # JobFinished and refusals end this worker; the message says why
            raise

    def agree(self, replica: Replica) -> None:
        try:
            self._synchronise(replica)
        except RuntimeError as error:
            self._failed(error, replica)

    def round_start(self, replica: Replica) -> None:
        self.agent.step = replica.steps
        try:
            due = self.membership.switch_due(replica.steps, replica.request_refresh)
        except RuntimeError as error:
            self._failed(error, replica)
            return
        if due:
            self._regroup(replica)

    def exchange(self, attempt: Callable[[], bool], replica: Replica) -> bool:
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
                if replica.steps != step:
                    return False  # a donor's later state, its exchange done, replaced this one

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
        self._regroup(replica)

    def _regroup(self, replica: Replica) -> None:
        """Enter the next generation and bring every member to the same state."""
        while True:
            self.membership.enter()
            try:
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

        plan = synchronise(replica.steps, self.membership.fresh, replica.replica_digest(), export, load)
        self.membership.fresh = False
        self.agent.step = replica.steps
        if plan.receivers:
            log.info("state from rank %d at step %d sent to ranks %s", plan.donor, plan.step, list(plan.receivers))


def membership_for(
    group: dist.ProcessGroup | None, coordinator: str | None, job: str, secret_file: str | None, fingerprint: str
) -> Membership:
    """FixedGroup, or ElasticGroup when a coordinator is named (or ``$DISTTRAIN_COORDINATOR`` is set)."""
    address = coordinator or os.environ.get(COORDINATOR_ENV)
    if not address:
        return FixedGroup(group)
    if group is not None:
        raise ValueError("a Session under a coordinator trains in the generations it forms: give no group")
    return ElasticGroup.connect(address, job, load_secret(secret_file), fingerprint)

"""Elastic membership inside the training process: enter generations, regroup after failures.

A Session's ``ElasticGroup`` (``disttrain/exchange/membership.py``) calls ``enter`` before training
and after any failed step, and ``switch_due`` at step boundaries (every ``sync_every`` steps, or at
round starts for local-step methods): the members agree (one 16-byte all_reduce) on the newest
generation any of them has heard of, so that all switch at the same step when workers join. A
broken generation (a member died, stopped or left) is abandoned at once: every wait of the
process polls the agent (``comm/waiting.py``) and gives up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from disttrain.comm.device import collective_device
from disttrain.comm.process_group import abandon
from disttrain.comm.waiting import abort_waits_when, wait_work
from disttrain.elastic.agent import Agent, View
from disttrain.elastic.node import NodeLost
from disttrain.elastic.signed_store import SignedStore

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ElasticConfig:
    """How this worker takes part in generations (the agent holds the coordinator's address)."""

    sync_every: int = 5
    generation_wait_s: float = 600.0  # how long to wait for a generation (e.g. below quorum)
    rendezvous_timeout_s: float = 15.0  # how long forming a process group may take
    collective_timeout_s: float = 300.0
    backend: str = "gloo"


class ElasticMembership:
    """This worker's place in the job: its agent, its generation, and whether it holds state."""

    def __init__(self, agent: Agent, config: ElasticConfig):
        self.agent = agent
        self.config = config
        self.fresh = True  # holds no state that others need (a new or evicted worker)
        self.awaiting_first_step = False  # set on entering a generation, cleared by its first step
        # The generation's store. Python must hold it: Gloo calls back into its methods (a new
        # group, the round-closing counters), which fail once the Python object is collected.
        self.store: SignedStore | None = None

    def _wanted(self, view: View) -> bool:
        if view.status in ("evicted", "node_lost"):
            return True
        return view.status == "active" and view.gen > self.agent.gen and self.agent.worker_id in view.roster

    def enter(self) -> View:
        """Block until a generation includes this worker, then join its process group. From then
        on every wait of this process gives up once the coordinator declares the generation broken."""
        abort_waits_when(self.agent.generation_broken)
        while True:
            view = self.agent.wait_for_view(self._wanted, self.config.generation_wait_s)
            if view.status == "node_lost" or (view.status == "evicted" and self.agent.node.key):
                raise NodeLost(
                    f"this process (local rank {self.agent.node.local_rank}) left the job with its node: a process of the "
                    "node was lost, or the node was evicted. A node joins and leaves as a unit: start the node's "
                    "processes again (torchrun --max-restarts does) and it joins as a new node"
                )
            if view.status == "evicted":
                evicted = self.agent.name
                self.agent.rejoin()
                log.warning("this worker (%s) was evicted; joining again as %s with fresh state", evicted, self.agent.name)
                self.fresh = True
                continue
            try:
                self._rebuild_group(view)
            except RuntimeError as error:
                log.warning("could not form generation %d (%s); waiting for the next", view.gen, error)
                self.agent.entered(view)
                self.agent.report_failure(self.agent.step)
                continue
            self.agent.entered(view)
            self.awaiting_first_step = True
            return view

    def _rebuild_group(self, view: View) -> None:
        if dist.is_initialized():
            abandon(dist.group.WORLD)
            abandon(self.store)
            dist.destroy_process_group()
        prefix = f"gen{view.gen}/{view.store_prefix}"
        store = dist.TCPStore(
            self.agent.host,
            view.store_port,
            is_master=False,
            timeout=timedelta(seconds=self.config.rendezvous_timeout_s),
        )
        self.store = SignedStore(dist.PrefixStore(prefix, store), self.agent.secret, context=prefix)
        dist.init_process_group(
            self.config.backend,
            store=self.store,
            rank=view.rank_of(self.agent.worker_id),
            world_size=len(view.roster),
            timeout=timedelta(seconds=self.config.rendezvous_timeout_s),  # a ghost member fails fast
        )
        # Collectives (a dense all-reduce over a slow link) may legitimately take much longer.
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is not None:
            set_timeout(timedelta(seconds=self.config.collective_timeout_s))
        log.info("%s entered generation %d as rank %d of %d", self.agent.name, view.gen, dist.get_rank(), dist.get_world_size())

    def switch_due(self, step: int, request_refresh: Callable[[], None]) -> bool:
        """Has any member heard of a newer generation? Also applies a basis refresh the coordinator
        asked for, on every member at this same step. Every member calls it at the same steps."""
        view = self.agent.view
        values = [view.gen, view.refresh_epoch] if view is not None else [0, 0]
        newest = torch.tensor(values, dtype=torch.int64, device=collective_device())
        wait_work(dist.all_reduce(newest, op=dist.ReduceOp.MAX, async_op=True))
        gen, epoch = (int(v) for v in newest)
        if epoch > self.agent.refresh_epoch:
            log.info("refreshing the SVD bases at step %d (refresh %d)", step, epoch)
            request_refresh()
            self.agent.refresh_epoch = epoch
        return gen > self.agent.gen

    def report_failure(self, step: int) -> None:
        self.agent.report_failure(step)

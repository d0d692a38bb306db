"""Local-step rounds with a node of several processes as one worker (``inner="ddp"`` or ``"fsdp"``).

Inside a node the processes average every inner step's gradients over the node's process group
(the fast link): torch DDP, each process holding the whole model, or FSDP2, each holding a shard
of every parameter and its optimizer state. At a round end each local rank runs the method's
exchange and outer step on its share of the parameters with the same local rank of every other
node (the slow link): a node sends one payload in all, in G streams side by side. Under DDP the
share is a subset of the parameters, broadcast to the rest of the node afterwards; under FSDP2
it is this process's shard of every parameter, and nothing else moves. The outer optimizer's
state, vote momentum and error feedback are per share; bytes are counted per node.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm.device import collective_device
from disttrain.comm.layout import NodeGroups, NodeLayout, local_part, parameter_shares
from disttrain.comm.waiting import wait_work
from disttrain.exchange.base import ExchangeOptions
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.methods import Method
from disttrain.optim.projected_adamw import ProjectedAdamW
from disttrain.train.replica import broadcast_optimizer_from_rank0, broadcast_tensors_from_rank0


class NodeRoundsExchange(LocalRoundsExchange):
    """DiLoCo rounds between nodes, on ``exchanged``: this local rank's share of the parameters."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Method,
        options: ExchangeOptions,
        layout: NodeLayout,
        exchanged: list[torch.nn.Parameter],
    ):
        if options.round_quorum < 1 or options.round_deadline_s is not None:
            raise ValueError("a round quorum or deadline needs every process to be a worker: use inner 'flat' with them")
        if isinstance(optimizer, ProjectedAdamW):
            raise ValueError(f"method {method.name!r} keeps its moments in a per-worker subspace: use inner 'flat' with it")
        self.layout = layout
        super().__init__(model, optimizer, method, dataclasses.replace(options, group=self.groups.cross_group), exchanged=exchanged)
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)

    @property
    def groups(self) -> NodeGroups:
        """The node and cross-node groups of the current generation."""
        return self.layout.groups

    def regrouped(self) -> None:
        self.reducer.group = self.groups.cross_group

    def finish(self) -> bool:
        exchanged = super().finish()
        if exchanged:
            self._share_round_result()
            self._count_node_bytes()
        return exchanged

    def _share_round_result(self) -> None:
        """After the outer step on this rank's share: whatever the rest of the node needs of it."""

    def _count_node_bytes(self) -> None:
        """The node's bytes of this round: the sum of its local ranks' shares."""
        counts = torch.tensor(
            [self.payload_bytes_last_step, self.wire_bytes_last_step], dtype=torch.int64,
            device=collective_device(self.groups.node_group),
        )
        wait_work(dist.all_reduce(counts, group=self.groups.node_group, async_op=True))
        self.payload_bytes_last_step, self.wire_bytes_last_step = (int(v) for v in counts.cpu())

    def shared_state_dict(self) -> dict[str, Any]:
        return {**super().shared_state_dict(), "local_rank": self.groups.local_rank}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("local_rank") != self.groups.local_rank:
            raise ValueError(
                f"this state holds local rank {state.get('local_rank')}'s share of the parameters, and this process is "
                f"local rank {self.groups.local_rank}: resume every process from its own checkpoint file"
            )
        super().load_shared_state_dict(state)


class DenseNodeRounds(NodeRoundsExchange):
    """torch DDP inside the node; each local rank exchanges a subset of the parameters and broadcasts it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions, layout: NodeLayout):
        groups = layout.groups
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) < groups.local_size:
            raise ValueError(
                f"the model has {len(trainable)} trainable tensors, fewer than the {groups.local_size} processes per node "
                "that would each exchange a share of them: use inner 'flat' (or 'fsdp', which splits every tensor)"
            )
        self.shares = parameter_shares(trainable, groups.local_size)
        super().__init__(model, optimizer, method, options, layout, self.shares[groups.local_rank])
        self.module = self._inside_the_node()

    def _inside_the_node(self) -> DistributedDataParallel:
        """torch DDP over the node's processes (it checks, collectively, that they hold the same shapes)."""
        return DistributedDataParallel(self.model, process_group=self.groups.node_group, init_sync=False)

    def regrouped(self) -> None:
        super().regrouped()
        del self.module  # the old DDP's hooks go with it, before the new one's are registered
        self.module = self._inside_the_node()

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.module.no_sync()  # backward passes inside accumulate without averaging over the node

    def _share_round_result(self) -> None:
        works = []
        with torch.no_grad():
            for local_rank, share in enumerate(self.shares):
                src = self.groups.node_rank_of(local_rank)
                works += [dist.broadcast(p.data, src=src, group=self.groups.node_group, async_op=True) for p in share]
        for work in works:
            wait_work(work)

    def take_rank0_replica(self) -> None:
        # Every process holds the whole model; the outer optimizer's state is per share, so it
        # comes from the same local rank of node 0.
        broadcast_tensors_from_rank0([p.data for p in self.model.parameters()])
        broadcast_optimizer_from_rank0(self.outer.outer, self.groups.cross_group)
        self.outer.adopt_current_weights()


class ShardedNodeRounds(NodeRoundsExchange):
    """FSDP2 inside the node: each process exchanges its own shard of every parameter."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions, layout: NodeLayout):
        trainable = [p for p in model.parameters() if p.requires_grad]
        unsharded = [name for name, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if unsharded:
            raise ValueError(
                f"inner 'fsdp' needs the model sharded over the node before its optimizer is built, and {unsharded[0]!r} is "
                "not: call disttrain.shard_within_node(model, blocks) first, then build the optimizer from model.parameters()"
            )
        # Parameters aliasing each local shard: what the exchange encodes, steps and writes in place.
        shards = [torch.nn.Parameter(local_part(p).detach()) for p in trainable]
        super().__init__(model, optimizer, method, options, layout, shards)

    def take_rank0_replica(self) -> None:
        broadcast_tensors_from_rank0(self.outer.params, self.groups.cross_group)
        broadcast_optimizer_from_rank0(self.outer.outer, self.groups.cross_group)
        self.outer.adopt_current_weights()


def node_rounds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions, layout: NodeLayout) -> NodeRoundsExchange:
    """The rounds between nodes for ``layout``: FSDP2 inside a node when it is sharded, else torch DDP."""
    kind = ShardedNodeRounds if layout.sharded else DenseNodeRounds
    return kind(model, optimizer, method, options, layout)

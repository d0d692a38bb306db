"""Which node a process of an elastic job belongs to, when a node of several processes is one worker.

Each node is started on its own (``torchrun --standalone --nproc-per-node G`` on every machine)
and joins the coordinator's job as a unit: its processes name the same node key, derived from
what torchrun gives every process of one node alike (host, run id, node rank, restart count), so
a node that torchrun restarts after losing a process joins again as a new node.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from disttrain.comm.layout import NODE_MODES, Inner

_SAME_ON_A_NODE = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")


class NodeLost(Exception):
    """Another process of this worker's node was lost, so the node left the job: its survivors end.

    Not a RuntimeError, which a session takes for a failed collective and redoes."""


@dataclass(frozen=True)
class NodeIdentity:
    """This process's node (``key``), its place in it and the node's size; key "" is a worker of one process."""

    key: str = ""
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_torchrun(cls, env: Mapping[str, str] = os.environ) -> NodeIdentity:
        """The node of a process that torchrun started, from its variables."""
        local_size = int(env.get("LOCAL_WORLD_SIZE") or 1)
        if local_size < 2:
            raise ValueError(
                "a node as one worker needs several processes per node: start each node with "
                "torchrun --standalone --nproc-per-node G (G > 1), or use inner 'flat'"
            )
        named = [socket.gethostname(), *(env.get(name, "") for name in _SAME_ON_A_NODE)]
        key = hashlib.sha256(repr(named).encode()).hexdigest()[:16]
        return cls(key, int(env.get("LOCAL_RANK") or 0), local_size)

    def join_fields(self) -> dict[str, str | int]:
        """What a join message says of the node."""
        return {"node": self.key, "local_rank": self.local_rank, "local_size": self.local_size}


def node_identity(inner: Inner, env: Mapping[str, str] = os.environ) -> NodeIdentity:
    """This process's node under ``inner``: torchrun's when a node is one worker, else none (refuses a
    node mode without several processes per node)."""
    return NodeIdentity.from_torchrun(env) if inner in NODE_MODES else NodeIdentity()

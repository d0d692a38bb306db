"""Who is a worker of the compressed exchange: every process, or every node of several processes.

A job launched with ``torchrun --nnodes N --nproc-per-node G`` has G processes per node, joined by
a fast link (NVLink, PCIe, a host's memory), and N nodes joined by a slow one. With the ``ddp``
or ``fsdp`` inner mode a node is one worker: its processes average every inner step over the
node's own process group (torch DDP, or FSDP2 with each process holding a shard of the model),
and at a round end each local rank exchanges its share of the parameters with the matching local
rank of every other node, so the G cross-node streams run side by side and a node sends one
payload in all. ``FlatLayout`` is every process a worker, as on one machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

Inner = Literal["auto", "flat", "ddp", "fsdp"]
INNER_MODES: tuple[Inner, ...] = ("auto", "flat", "ddp", "fsdp")
NODE_MODES: tuple[Inner, ...] = ("ddp", "fsdp")  # a node of several processes is one worker

T = TypeVar("T")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP2 parameter's local shard, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensors_bytes(values: Iterable[object]) -> int:
    """Bytes this process holds of the tensors among ``values`` (nested in dicts and lists too)."""
    total = 0
    for value in values:
        if isinstance(value, dict):
            total += tensors_bytes(value.values())
        elif isinstance(value, (list, tuple)):
            total += tensors_bytes(value)
        elif torch.is_tensor(value):
            part = local_part(value)
            total += part.numel() * part.element_size()
    return total


class Layout(Protocol):
    workers: int  # members of the compressed exchange: processes, or nodes
    processes_per_worker: int
    replica_group: dist.ProcessGroup | None  # among whom replicas are compared
    lockstep_forward: bool  # a node's processes run every forward pass together (FSDP2 gathers parameters in it)

    def describe(self) -> str:
        """The layout in words, for the log."""

    def fingerprint_fields(self) -> dict[str, int | str]:
        """What a checkpoint must be resumed with (each local rank's state holds its own share)."""

    def replica_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """What every member of ``replica_group`` holds bit for bit where replicas agree."""

    @property
    def transfer_group(self) -> dist.ProcessGroup | None:
        """Among whom a joiner's state goes from a donor: each process receives its own share."""

    def regroup(self) -> None:
        """A coordinator formed a new generation: make this layout's process groups in it (collective)."""


@dataclass(frozen=True)
class FlatLayout:
    """Every process is a worker of the compressed exchange (of ``group``, or of the current generation)."""

    group: dist.ProcessGroup | None = None
    processes_per_worker = 1
    lockstep_forward = False

    @property
    def workers(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        return self.group

    def describe(self) -> str:
        return f"{self.workers} workers, one process each"

    def fingerprint_fields(self) -> dict[str, int | str]:
        return {}

    def replica_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return list(model.parameters())

    @property
    def transfer_group(self) -> dist.ProcessGroup | None:
        return self.group

    def regroup(self) -> None:
        pass  # the generation's whole group, found anew at every collective


@dataclass(frozen=True)
class NodeGroups:
    """This process's node and local rank, and the process groups of both levels."""

    nodes: int
    local_size: int
    node: int  # this process's node
    local_rank: int  # this process's place in its node
    node_group: dist.ProcessGroup  # this node's processes: the fast link
    cross_group: dist.ProcessGroup  # this local rank on every node: the slow link
    node_mesh: DeviceMesh  # the node's processes as a mesh, what FSDP2's fully_shard takes

    def node_rank_of(self, local_rank: int) -> int:
        """The global rank of ``local_rank`` on this node."""
        return self.node * self.local_size + local_rank


@dataclass
class NodeLayout:
    """A node of several processes is one worker: torch DDP inside it (``sharded`` False) or FSDP2.
    Under a coordinator the groups are made anew in every generation (``regroup``), its ranks numbering the nodes."""

    groups: NodeGroups
    sharded: bool  # FSDP2: each process holds a shard of every parameter; else each holds all of them

    @property
    def workers(self) -> int:
        return self.groups.nodes

    @property
    def processes_per_worker(self) -> int:
        return self.groups.local_size

    @property
    def lockstep_forward(self) -> bool:
        return self.sharded

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        # Every process holds the whole model under DDP; under FSDP2 the same local rank of every node holds the same shard.
        return self.groups.cross_group if self.sharded else None

    def describe(self) -> str:
        inside = "FSDP2, each process holding a shard of the model" if self.sharded else "torch DDP"
        return (
            f"{self.groups.nodes} nodes x {self.groups.local_size} processes: inner steps averaged inside each node by "
            f"{inside}, each local rank exchanging its share of the parameters with its peers on the other nodes"
        )

    def fingerprint_fields(self) -> dict[str, int | str]:
        return {"processes_per_node": self.groups.local_size, "inner": "fsdp" if self.sharded else "ddp"}

    def replica_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return [local_part(p) for p in model.parameters()]

    @property
    def transfer_group(self) -> dist.ProcessGroup | None:
        return self.groups.cross_group  # the same local rank of every node holds the same share

    def regroup(self) -> None:
        self.groups = node_groups(numbered_by_rank=True)  # only a coordinator's generations change


def balanced_shares(items: Sequence[T], sizes: Sequence[int], parts: int) -> list[list[T]]:
    """``items`` split into ``parts`` lists of near-equal total size (largest first, each to the lightest
    part), each list in the items' own order: the same on every process that calls it alike."""
    loads = [0] * parts
    owner = [0] * len(items)
    for index in sorted(range(len(items)), key=lambda i: (-sizes[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        owner[index] = part
        loads[part] += sizes[index]
    return [[item for item, o in zip(items, owner) if o == part] for part in range(parts)]


def parameter_shares(params: Sequence[torch.nn.Parameter], parts: int) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters split by element count among a node's ``parts`` local ranks."""
    return balanced_shares(list(params), [p.numel() for p in params], parts)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    return int(value) if value not in (None, "") else None


def spans_nodes(env: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun laid this job out as several nodes of several processes each."""
    local_size = _env_int(env, "LOCAL_WORLD_SIZE") or 1
    return 1 < local_size < dist.get_world_size()


_NODE_GROUPS: dict[int, tuple[dist.ProcessGroup, NodeGroups]] = {}  # per default process group: made once


def node_groups(env: Mapping[str, str] = os.environ, numbered_by_rank: bool = False) -> NodeGroups:
    """The node and cross-node process groups of this torchrun job, made the first time (collective then:
    every rank makes every node's and every local rank's group, in the same order). ``numbered_by_rank``:
    the nodes are numbered by the ranks a coordinator gave (each node standalone to torchrun), not GROUP_RANK."""
    world_group = dist.group.WORLD
    made = _NODE_GROUPS.get(id(world_group))
    if made is not None and made[0] is world_group:
        return made[1]
    world, rank = dist.get_world_size(), dist.get_rank()
    local_size = _env_int(env, "LOCAL_WORLD_SIZE") or 1
    if local_size < 2:
        raise ValueError(
            "a node as one worker needs several processes per node: launch with torchrun --nproc-per-node G (G > 1), "
            "which sets LOCAL_WORLD_SIZE, or use inner 'flat'"
        )
    if world % local_size:
        raise ValueError(f"a node as one worker needs the same processes on every node: {world} processes are not nodes of {local_size}")
    node = None if numbered_by_rank else _env_int(env, "GROUP_RANK")
    local_rank = _env_int(env, "LOCAL_RANK")
    node = rank // local_size if node is None else node
    local_rank = rank % local_size if local_rank is None else local_rank
    if rank != node * local_size + local_rank:
        raise ValueError(
            f"a node as one worker needs ranks numbered node by node (torchrun's order): rank {rank} is local rank "
            f"{local_rank} of node {node} with {local_size} processes per node"
        )
    nodes = world // local_size
    node_group = cross_group = None
    for n in range(nodes):
        created = dist.new_group([n * local_size + r for r in range(local_size)])
        node_group = created if n == node else node_group
    for r in range(local_size):
        created = dist.new_group([n * local_size + r for n in range(nodes)])
        cross_group = created if r == local_rank else cross_group
    assert node_group is not None and cross_group is not None
    device = "cuda" if dist.get_backend(node_group) == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(node_group, device)
    groups = NodeGroups(nodes, local_size, node, local_rank, node_group, cross_group, mesh)
    _NODE_GROUPS[id(world_group)] = (world_group, groups)
    return groups


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The entries of the model's outermost ModuleLists (a transformer's blocks): FSDP2's units."""
    layers: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, torch.nn.ModuleList):
            layers += list(module)
            inside |= {id(m) for m in module.modules()}
    return layers


def shard_within_node(model: torch.nn.Module, modules: Sequence[torch.nn.Module] | None = None) -> torch.nn.Module:
    """FSDP2 over this node's processes (``inner="fsdp"``): each of ``modules`` (default: the model's
    repeated layers, gathered one at a time in forward and backward), then the rest of ``model``.
    Call it before building the optimizer, which must hold the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    mesh = node_groups().node_mesh
    for module in repeated_layers(model) if modules is None else modules:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_elastic_inner(inner: Inner) -> None:
    """Refuse an inner mode that cannot follow a coordinator's generations (before anything joins)."""
    if inner == "fsdp":
        raise ValueError(
            "inner 'fsdp' under a coordinator: FSDP2 binds its shards to one process group, and a coordinator forms a new "
            "one in every generation; use inner 'ddp' (a node still joins and leaves as a unit) or 'flat'"
        )


def layout_for(inner: Inner, group: dist.ProcessGroup | None = None, elastic: bool = False) -> Layout:
    """The layout of ``inner`` for this process, from torchrun's variables (LOCAL_WORLD_SIZE, GROUP_RANK),
    or under a coordinator (``elastic``) from the generation's ranks.

    ``auto`` makes a node the worker (with DDP inside) when the job has several nodes of several
    processes each; on one machine every process stays a worker (sites emulated on one host). The
    Session asks for ``flat`` instead where a node cannot be a worker (elastic jobs, per-step methods).
    """
    if inner == "flat" or (inner == "auto" and not (dist.is_initialized() and group is None and spans_nodes())):
        return FlatLayout(group)
    if group is not None:
        raise ValueError(f"inner {inner!r} builds its node and cross-node groups from the whole job: give the Session no group")
    if not dist.is_initialized():
        raise RuntimeError(f"inner {inner!r} needs torchrun's process group: call torch.distributed.init_process_group first")
    return NodeLayout(node_groups(numbered_by_rank=elastic), sharded=inner == "fsdp")

"""What a Session asks of its exchange, and the settings every exchange is built from."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import DEFAULT_BUCKET_CAP_BYTES
from disttrain.comm.layout import FlatLayout, Layout
from disttrain.comm.link import LinkEmulator
from disttrain.federated.zeroth_order import ZOConfig
from disttrain.train.replica import broadcast_from_rank0

Closure = Callable[[], torch.Tensor]  # a forward pass that returns the loss


@dataclass(frozen=True)
class ExchangeOptions:
    """How an exchange is built: the same on every worker."""

    seed: int = 0  # keys the seeded bases and random streams
    group: dist.ProcessGroup | None = None
    link_mbit: float | None = None  # pace every collective as on an uplink this slow
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES
    overlap: bool = True  # launch a per-step method's collectives during backward
    elastic: bool = False  # under a coordinator: membership changes, so payloads stay as configured
    total_steps: int | None = None  # a local-step round also ends at this step, however H divides it
    round_quorum: float = 1.0  # a round closes once this share of the workers finished it
    round_deadline_s: float | None = None  # ... or this long after the first finished
    zeroth_order: ZOConfig = field(default_factory=ZOConfig)
    layout: Layout = field(default_factory=FlatLayout)  # who a worker is: a process, or a node of several

    def link(self) -> LinkEmulator | None:
        return LinkEmulator(self.link_mbit) if self.link_mbit else None


class Exchange(Protocol):
    reducer: Any  # the CompressedAllReduce it sends through (None for torch DDP and zeroth-order steps)
    module: torch.nn.Module  # what forward passes go through: the model, or torch DDP's wrapper of it
    needs_closure: bool  # the method runs the forward passes itself: step() needs the closure
    in_sync: bool  # whether every replica holds the same weights after the last step
    payload_bytes_last_step: int  # what this worker put into collectives in the last step
    wire_bytes_last_step: int  # what those collectives moved per worker
    dense_bytes_per_step: int  # what a dense fp32 all-reduce of the exchanged parameters moves

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Backward passes inside accumulate locally; the step after them sends the sum."""

    def synchronize(self) -> None:
        """Make ``.grad`` what the optimizer step will use (the average, for per-step methods)."""

    def local_work_counts(self, step: int) -> bool:
        """Whether step ``step``'s forward and backward will count (False once a round closed without this worker)."""

    def step(self, step: int, closure: Closure | None) -> bool:
        """Take optimizer step number ``step`` (0-based); True when it exchanged."""

    def membership_may_change(self, steps: int, sync_every: int) -> bool:
        """Whether elastic members may switch generations before step ``steps`` (replicas agree there)."""

    def take_rank0_replica(self) -> None:
        """Collective, after a replica check found replicas that differ: every rank takes rank 0's
        weights and the optimizer state every replica holds alike."""

    def finish(self) -> bool:
        """Exchange what is pending, so that replicas agree; True when it exchanged."""

    def replica_parameters(self) -> list[torch.Tensor]:
        """The parameters every replica holds alike whenever membership may change."""

    def state_dict(self) -> dict[str, Any]:
        """This worker's exchange state, for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""

    def shared_state_dict(self) -> dict[str, Any]:
        """What a worker joining now needs to match the others (never a worker's own residuals)."""

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        """Take a donor's shared_state_dict()."""

    def generation_failed(self) -> None:
        """The elastic generation broke (a member died): drop what depended on it, before the regroup."""

    def regrouped(self) -> None:
        """A new elastic generation's process groups exist (the layout's too): hold them instead of the old ones."""


class EveryStepAgrees:
    """What exchanges whose replicas agree after every step share: no rounds, the model is the only copy."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    group: dist.ProcessGroup | None
    in_sync = True

    def local_work_counts(self, step: int) -> bool:
        return True

    def membership_may_change(self, steps: int, sync_every: int) -> bool:
        return steps % sync_every == 0

    def finish(self) -> bool:
        return False  # every step already ended in agreement

    def take_rank0_replica(self) -> None:
        broadcast_from_rank0(self.model, self.optimizer, self.group)  # the same averaged update ran on every replica

    def replica_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    def generation_failed(self) -> None:
        pass  # a failed step left nothing behind: the redo starts from its gradients

    def regrouped(self) -> None:
        pass  # the generation's whole group is found anew at every collective


def peak_lr_of(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer started with (a torch scheduler keeps it as ``initial_lr``)."""
    group = optimizer.param_groups[0]
    return group.get("initial_lr", group["lr"])


def require_closure(closure: Closure | None, method: str) -> Closure:
    """The closure a method that runs its own forward passes needs, or a clear error."""
    if closure is None:
        raise TypeError(
            f"method {method!r} evaluates the loss itself: call session.step(lambda: loss_fn(model(x), y)) "
            "with the forward pass as a closure, and no backward()"
        )
    return closure

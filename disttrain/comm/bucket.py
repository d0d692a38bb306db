"""A bucket: the compressed payloads of several parameters, moved by one collective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.link import ring_wire_bytes
from disttrain.comm.waiting import wait_work
from disttrain.compress.base import Compressor


# torch 2.13 renamed all_gather_into_tensor; keep working on the older releases users run.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class PendingExchange:
    """A launched collective and the buffers it fills."""

    work: dist.Work | None
    output: torch.Tensor
    payload_bytes: int  # what this worker put into the collectives
    wire_bytes: int  # what they move per worker (see link.ring_wire_bytes)


def _group_src(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


class Bucket:
    """Packs payloads into one flat tensor; all_reduce when they are summable, else all_gather.

    Summable buckets hold wire payloads of one dtype, laid end to end. Gather buckets hold raw
    bytes (int8 payloads with their scales, fp32 dense payloads viewed as bytes) and every
    worker's copy is decoded separately, in rank order, so that all workers sum identically.
    """

    def __init__(self, param_indices: list[int], compressors: list[Compressor]):
        self.param_indices = param_indices
        self.compressors = compressors
        dtypes = {c.wire_dtype for c in compressors}
        self.summable = all(c.summable for c in compressors) and len(dtypes) == 1
        self.dtype = dtypes.pop() if self.summable else torch.uint8

    @property
    def offsets(self) -> list[int]:
        """Where each payload starts in the flat tensor (sizes may change between steps)."""
        sizes = [c.wire_numel() if self.summable else c.wire_bytes() for c in self.compressors]
        return [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def payload_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def payload_bytes_for(self, world_size: int) -> int:
        """What a worker puts into this bucket's collectives among ``world_size`` workers."""
        return self.payload_bytes

    def wire_bytes(self, world_size: int) -> int:
        """What those collectives move per worker."""
        return ring_wire_bytes("all_reduce" if self.summable else "all_gather", self.payload_bytes, world_size)

    def commit(self) -> None:
        """Make the bucket's own state of the last exchange current (a plain bucket keeps none)."""

    def rollback(self) -> None:
        """Forget the bucket's own state of the last exchange."""

    def state_dict(self) -> dict[str, Any]:
        """The bucket's own state, for checkpoints (a plain bucket keeps none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""

    def refresh_bases(self, grads: list[torch.Tensor], step: int, group: dist.ProcessGroup | None) -> int:
        """Broadcast freshly computed data-dependent bases from rank 0; returns bytes sent."""
        due = [i for i, c in enumerate(self.compressors) if c.needs_shared_basis(step)]
        if not due:
            return 0
        sizes = [self.compressors[i].basis_numel() for i in due]
        if dist.get_rank(group) == 0:
            flat = torch.cat([self.compressors[i].propose_basis(grads[i]).reshape(-1) for i in due])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=grads[0].device)
        wait_work(dist.broadcast(flat, src=_group_src(group), group=group, async_op=True))
        for i, piece in zip(due, flat.split(sizes)):
            self.compressors[i].set_basis(piece)
        return flat.numel() * flat.element_size()

    def encode(self, grads: list[torch.Tensor]) -> torch.Tensor:
        wires = [c.encode(g) for c, g in zip(self.compressors, grads)]
        if not self.summable:
            wires = [w.contiguous().view(torch.uint8).reshape(-1) for w in wires]
        return torch.cat(wires)

    def launch(self, flat: torch.Tensor, group: dist.ProcessGroup | None) -> PendingExchange:
        """Start the one collective of this bucket (asynchronously)."""
        world = dist.get_world_size(group)
        if self.summable:
            work = dist.all_reduce(flat, group=group, async_op=True)
            return PendingExchange(work, flat, self.payload_bytes, self.wire_bytes(world))
        output = torch.empty(world * flat.numel(), dtype=torch.uint8, device=flat.device)
        work = all_gather_flat(output, flat, group=group, async_op=True)
        return PendingExchange(work, output, self.payload_bytes, self.wire_bytes(world))

    def _decoded_means(self, output: torch.Tensor, world_size: int, divisor: int) -> list[torch.Tensor]:
        """Each parameter's coefficients summed over the ``world_size`` payloads in ``output``, over ``divisor``."""
        offsets = self.offsets
        if self.summable:
            return [c.decode(output[lo:hi]) / divisor for c, lo, hi in zip(self.compressors, offsets, offsets[1:])]
        rows = output.view(world_size, -1)
        return [c.mean_of_payloads(rows[:, lo:hi], divisor) for c, lo, hi in zip(self.compressors, offsets, offsets[1:])]

    def own_coefficients(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """This worker's payload ``flat`` decoded alone, as if it were the only worker (shown to no compressor)."""
        return self._decoded_means(flat, 1, 1)

    def mean_coefficients(self, output: torch.Tensor, world_size: int, divisor: int) -> list[torch.Tensor]:
        """The workers' summed coefficients for each parameter over ``divisor``, from the collective's
        output; each compressor is shown its mean (a basis that follows the average prepares its next one)."""
        means = self._decoded_means(output, world_size, divisor)
        for compressor, mean in zip(self.compressors, means):
            compressor.accept_mean(mean)
        return means


BucketFactory = Callable[[list[int], list[Compressor]], Bucket]


def plan_buckets(compressors: list[Compressor], cap_bytes: int, make: BucketFactory = Bucket) -> list[Bucket]:
    """Groups parameters in reverse order (the order backward produces gradients) up to a cap."""
    buckets: list[Bucket] = []
    indices: list[int] = []
    size = 0
    for index in reversed(range(len(compressors))):
        wire = compressors[index].wire_bytes()
        if indices and size + wire > cap_bytes:
            buckets.append(make(indices, [compressors[i] for i in indices]))
            indices, size = [], 0
        indices.append(index)
        size += wire
    if indices:
        buckets.append(make(indices, [compressors[i] for i in indices]))
    return buckets

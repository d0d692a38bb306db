"""A DDP communication hook: the drop-in replacement for torch's ``powerSGD_hook``.

    state = DisttrainHookState(model.parameters(), CompressionSpec(basis="seeded", rank=8))
    ddp_model.register_comm_hook(state, disttrain_hook)

Each DDP bucket costs one collective; error feedback lives in the state.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime.
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from disttrain.comm.bucket import Bucket
from disttrain.comm.link import ring_wire_bytes
from disttrain.compress.base import Compressor
from disttrain.compress.factory import CompressionSpec, build_compressor


class DisttrainHookState:
    """One compressor per parameter (keyed by the parameter's storage), and the step count."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        spec: Optional[CompressionSpec] = None,
        seed: int = 0,
        process_group: Optional[dist.ProcessGroup] = None,
    ):
        self.spec = spec or CompressionSpec()
        self.spec.validate()
        if self.spec.vote_reduction != "all_gather":
            raise ValueError(
                f"vote_reduction={self.spec.vote_reduction!r} takes two dependent collectives, which a DDP "
                "comm hook cannot run: use it through disttrain.Session, or vote_reduction='all_gather' here"
            )
        self.process_group = process_group
        trainable = [p for p in params if p.requires_grad]
        self._index_by_storage = {p.data_ptr(): i for i, p in enumerate(trainable)}
        self.compressors: list[Compressor] = [
            build_compressor(self.spec, p.shape, i, seed) for i, p in enumerate(trainable)
        ]
        self.step = 0
        self.payload_bytes = 0
        self.wire_bytes = 0  # what the collectives move per worker (see link.ring_wire_bytes)

    def compressor_index(self, param: torch.Tensor) -> int:
        try:
            return self._index_by_storage[param.data_ptr()]
        except KeyError:
            raise KeyError(
                "DDP handed the hook a parameter the state does not know: build "
                "DisttrainHookState from the same model's parameters that DDP wraps"
            ) from None


def disttrain_hook(state: DisttrainHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Compress a DDP bucket, exchange it in one collective, and return the averaged gradients."""
    group = state.process_group
    grads = bucket.gradients()
    indices = [state.compressor_index(p) for p in bucket.parameters()]
    exchange = Bucket(indices, [state.compressors[i] for i in indices])
    for compressor in exchange.compressors:
        compressor.begin_step(state.step)
    world_size = dist.get_world_size(group)
    basis_bytes = exchange.refresh_bases(grads, state.step, group)
    pending = exchange.launch(exchange.encode(grads), group)
    state.payload_bytes += basis_bytes + pending.payload_bytes
    state.wire_bytes += ring_wire_bytes("broadcast", basis_bytes, world_size)
    state.wire_bytes += pending.wire_bytes
    if bucket.is_last():
        state.step += 1

    def decode(_: torch.futures.Future) -> torch.Tensor:
        buffer = bucket.buffer()
        offset = 0
        means = exchange.mean_coefficients(pending.output, world_size, world_size)
        for grad, compressor, mean in zip(grads, exchange.compressors, means):
            buffer[offset : offset + grad.numel()].copy_(compressor.reconstruct(mean).reshape(-1))
            offset += grad.numel()
            compressor.commit()
        return buffer

    assert pending.work is not None
    return pending.work.get_future().then(decode)

"""The replica check: compare a digest of the parameters across workers and repair from rank 0."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from disttrain.comm.bucket import all_gather_flat
from disttrain.comm.device import collective_device
from disttrain.comm.waiting import wait_work

log = logging.getLogger(__name__)


def tensors_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA-256 over the exact bytes of the tensors, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest()


def parameter_digest(module: torch.nn.Module) -> bytes:
    """SHA-256 over the exact bytes of every parameter, in registration order."""
    return tensors_digest(module.parameters())


def _state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            tensors.extend(state[key] for key in sorted(state) if torch.is_tensor(state[key]))
    return tensors


def broadcast_from_rank0(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Overwrite parameters (and optimizer state) on every worker with rank 0's."""
    broadcast_tensors_from_rank0([p.data for p in module.parameters()] + _state_tensors(optimizer), group)


def broadcast_optimizer_from_rank0(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite the optimizer's state on every worker of ``group`` with its rank 0's."""
    broadcast_tensors_from_rank0(_state_tensors(optimizer), group)


def broadcast_tensors_from_rank0(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Collective: every rank's ``tensors`` become rank 0's, one broadcast each."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in tensors:
            wait_work(dist.broadcast(tensor, src=src, group=group, async_op=True))


def ranks_differing_from_rank0(digest: bytes, group: dist.ProcessGroup | None = None) -> list[int]:
    """Collective: the ranks whose ``digest`` differs from rank 0's (one all_gather of the digests)."""
    device = collective_device(group)
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=device)
    wait_work(all_gather_flat(gathered, mine, group=group, async_op=True))
    digests = gathered.reshape(world, -1).cpu()
    return [r for r in range(world) if not torch.equal(digests[r], digests[0])]


def start_from_rank0(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Collective: every rank ends with rank 0's ``tensors`` (a model's parameters and buffers). They are
    compared by digest first and sent only if some rank's differ: on a slow link a model is worth not sending."""
    tensors = [t.detach() for t in tensors]
    differing = ranks_differing_from_rank0(tensors_digest(tensors), group)
    if not differing:
        log.info("every rank starts from the same parameters and buffers: nothing to broadcast")
        return
    log.info("ranks %s start from other parameters than rank 0: broadcasting rank 0's", differing)
    broadcast_tensors_from_rank0(tensors, group)


def check_replicas(
    module: torch.nn.Module,
    group: dist.ProcessGroup | None = None,
    step: int | None = None,
    repair: Callable[[], None] | None = None,
    tensors: list[torch.Tensor] | None = None,
) -> bool:
    """True when every worker holds bit-identical parameters (or ``tensors``: what each replica holds
    of them); otherwise log and ``repair()`` (by default: every rank takes rank 0's parameters)."""
    mine = parameter_digest(module) if tensors is None else tensors_digest(tensors)
    diverged = ranks_differing_from_rank0(mine, group)
    if not diverged:
        return True
    log.error(
        "replica check at step %s: ranks %s hold parameters that differ from rank 0; repairing from rank 0",
        step,
        diverged,
    )
    (repair or (lambda: broadcast_from_rank0(module, None, group)))()
    return False

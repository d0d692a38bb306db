"""State transfer at the start of a generation: one donor brings every stale worker up to date.

All workers share (committed step, fresh?, parameter digest) in one small all_gather. The donor
is the lowest rank among the non-fresh workers with the highest committed step (or rank 0 when
all are fresh, as at the very start, where identical seeded initialisations need no transfer).
Fresh workers (joiners) and any worker whose step or digest differs receive the donor's replica
state, broadcast in a process group of the donor and its receivers only; the others receive
nothing. (Not point to point: a Gloo send or receive whose wait is polled with a timeout, as
every wait under a coordinator is, closes its connection when one poll expires, and a state of
50 MB or more takes longer than a poll.)
"""

from __future__ import annotations

import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from disttrain.comm.bucket import all_gather_flat
from disttrain.comm.device import collective_device
from disttrain.comm.process_group import abandon
from disttrain.comm.waiting import wait_work

log = logging.getLogger(__name__)
_DIGEST_BYTES = 32


@dataclass(frozen=True)
class SyncPlan:
    donor: int
    receivers: tuple[int, ...]
    step: int


def plan_sync(table: torch.Tensor) -> SyncPlan:
    """Rows are [step, fresh, digest bytes...], one per rank."""
    steps, fresh, digests = table[:, 0], table[:, 1], table[:, 2:]
    candidates = [r for r in range(len(table)) if not fresh[r]] or list(range(len(table)))
    best = max(int(steps[r]) for r in candidates)
    donor = min(r for r in candidates if int(steps[r]) == best)
    stale = [
        bool(fresh[r] and not fresh[donor]) or int(steps[r]) != best or not torch.equal(digests[r], digests[donor])
        for r in range(len(table))
    ]
    receivers = tuple(r for r in range(len(table)) if r != donor and stale[r])
    return SyncPlan(donor, receivers, best)


def _serialise(state: dict[str, Any]) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _transfer(
    plan: SyncPlan, donor: bool, export: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None], device: torch.device
) -> None:
    """The donor's state to its receivers: its size, then its bytes, broadcast in their own group."""
    started = time.monotonic()
    group = dist.new_group(sorted((plan.donor, *plan.receivers)), use_local_synchronization=True)
    try:
        payload = _serialise(export()).to(device) if donor else None
        serialised = time.monotonic()
        size = torch.tensor([payload.numel() if donor else 0], dtype=torch.int64, device=device)
        wait_work(dist.broadcast(size, src=plan.donor, group=group, async_op=True))
        if not donor:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        wait_work(dist.broadcast(payload, src=plan.donor, group=group, async_op=True))
    except BaseException:
        abandon(group)
        raise
    dist.destroy_process_group(group)
    moved = time.monotonic()
    if donor:
        log.info(
            "state from rank %d at step %d sent to ranks %s: %.1f MB, serialised in %.2f s, sent in %.2f s",
            plan.donor, plan.step, list(plan.receivers), payload.numel() / 1e6, serialised - started, moved - serialised,
        )
        return
    load(torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), weights_only=False, map_location=device))
    log.info(
        "state of step %d received from rank %d: %.1f MB in %.2f s (the donor's serialising included), loaded in %.2f s",
        plan.step, plan.donor, payload.numel() / 1e6, moved - started, time.monotonic() - moved,
    )


def synchronise(
    step: int,
    fresh: bool,
    digest: bytes,
    export: Callable[[], dict[str, Any]],
    load: Callable[[dict[str, Any]], None],
    group: dist.ProcessGroup | None = None,
) -> SyncPlan:
    """Bring every stale worker of ``group`` (default: the current process group) to the donor's
    state; the plan's ranks are ``group``'s."""
    device = collective_device(group)
    mine = torch.tensor([step, int(fresh), *digest], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    wait_work(all_gather_flat(gathered, mine, group=group, async_op=True))
    plan = plan_sync(gathered.reshape(world, -1).cpu())
    rank = dist.get_rank(group)
    if plan.receivers and (rank == plan.donor or rank in plan.receivers):
        _transfer(in_global_ranks(plan, group), rank == plan.donor, export, load, device)
    return plan


def in_global_ranks(plan: SyncPlan, group: dist.ProcessGroup | None) -> SyncPlan:
    """The plan with ``group``'s ranks as ranks of the whole job (what new_group and broadcast take)."""
    if group is None:
        return plan
    to_global = functools.partial(dist.get_global_rank, group)
    return SyncPlan(to_global(plan.donor), tuple(map(to_global, plan.receivers)), plan.step)

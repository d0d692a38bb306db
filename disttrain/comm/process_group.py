"""Ending a process group cleanly, or leaving one behind that cannot end cleanly."""

from __future__ import annotations

import gc

import torch.distributed as dist

# Process groups abandoned mid-collective. Destroying one blocks until its silent peers answer,
# so they are kept here instead; each holds a few sockets and threads.
_ABANDONED: list[object] = []


def abandon(group: object) -> None:
    """Keep ``group`` alive for the rest of the process, so that destroying the process groups never waits on it."""
    _ABANDONED.append(group)


def close_process_group() -> None:
    """Collect what still holds the process group, wait for every rank, then destroy the group.

    Call it after dropping your own references to the group's users (a DDP model, a trainer):
    done now, while the interpreter still runs, Gloo's threads are joined here and not during
    interpreter shutdown, where they can abort the process ("terminate called without an active
    exception") or overtake the last collective's cleanup.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

"""Waiting on a collective without hanging on a peer that went quiet.

A killed peer makes Gloo fail at once, but a stopped or partitioned one sends nothing: the
collective would block until the process group's timeout. With an abort check (the elastic
agent's "your generation is broken"), waits poll and give up as soon as it says so.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import torch.distributed as dist

AbortCheck = Callable[[], bool]
POLL = timedelta(seconds=0.1)


class CollectiveAborted(RuntimeError):
    """The coordinator declared this generation broken while a collective was in flight."""


def wait_work(work: dist.Work, abort_check: AbortCheck | None = None) -> None:
    """``work.wait()``, polled so that ``abort_check`` can end it early."""
    if abort_check is None:
        work.wait()
        return
    while True:
        try:
            work.wait(timeout=POLL)
            return
        except RuntimeError as error:
            if "timed out" not in str(error).lower():
                raise
        if work.is_completed():
            return
        if abort_check():
            raise CollectiveAborted("the generation was declared broken while a collective was in flight")

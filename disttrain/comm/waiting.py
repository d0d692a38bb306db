"""Waiting on a collective without hanging on a peer that went quiet.

A killed peer makes Gloo fail at once, but a stopped or partitioned one sends nothing: the
collective would block until the process group's timeout. Under a coordinator, the elastic
membership registers one abort check for the whole process (``abort_waits_when``: "this
generation is broken"); from then on every wait polls it and gives up as soon as it says so.
Nothing else carries failures: a broken wait raises, and the membership regroups.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

AbortCheck = Callable[[], bool]
POLL = timedelta(seconds=0.1)

_abort_check: AbortCheck | None = None


class CollectiveAborted(RuntimeError):
    """The coordinator declared this generation broken while a collective was in flight."""


def abort_waits_when(check: AbortCheck | None) -> None:
    """From now on, every wait of this process gives up once ``check()`` is true (None: waits block)."""
    global _abort_check
    _abort_check = check


def raise_if_aborted(what: str = "a collective was in flight") -> None:
    """Raise CollectiveAborted if the registered check says this generation is broken."""
    if _abort_check is not None and _abort_check():
        raise CollectiveAborted(f"the generation was declared broken while {what}")


def wait_work(work: dist.Work) -> None:
    """``work.wait()``, polled so that the registered abort check can end it early."""
    if _abort_check is None:
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
        raise_if_aborted()


def sleep_unless_aborted(seconds: float, what: str) -> None:
    """Sleep between polls of something other than a collective, giving up like a wait does."""
    raise_if_aborted(what)
    time.sleep(seconds)

"""Closing a local-step round at a quorum or a deadline, so that stragglers cannot hold it up.

Each worker that finishes its round's local steps adds 1 to the round's counter in the process
group's store. The first to finish closes the round, once ceil(quorum x workers) have finished or
``deadline_s`` after it finished itself, by adding CLOSED to the counter: one atomic operation,
so a worker whose own add returned less than CLOSED finished in time, and one whose add returned
more finished late. The closer also writes how many finished in time, so every worker divides
the exchanged sum by the same count without another collective. A late worker's round work is
dropped: it takes part in the exchange with a zero pseudo-gradient. Workers still computing
check the counter before each local step and stop as soon as the round is closed.
"""

from __future__ import annotations

import math
import time

import torch.distributed as dist

from disttrain.comm.waiting import sleep_unless_aborted

CLOSED = 1 << 40
POLL_S = 0.005


def _store() -> dist.Store:
    """The default process group's store (under a coordinator, the generation's prefixed store)."""
    return dist.distributed_c10d._get_default_store()


class RoundClosing:
    """Decides, the same way on every worker, which workers' round work counts."""

    def __init__(self, quorum: float = 1.0, deadline_s: float | None = None):
        self.quorum = quorum
        self.deadline_s = deadline_s

    @property
    def active(self) -> bool:
        """Without a quorum below 1 or a deadline, every round waits for every worker."""
        return self.quorum < 1 or self.deadline_s is not None

    @staticmethod
    def _key(round_index: int) -> str:
        return f"disttrain/round{round_index}/finished"

    def closed(self, round_index: int) -> bool:
        """Whether round ``round_index`` closed already (so local work on it would be wasted)."""
        return _store().add(self._key(round_index), 0) >= CLOSED

    def finish(self, round_index: int, world_size: int) -> tuple[bool, int]:
        """Report this worker's round done and wait for the round to close.

        Returns (whether this worker finished in time, how many workers did).
        """
        store, key = _store(), self._key(round_index)
        position = store.add(key, 1)
        if position == 1:
            self._close_when_due(store, key, world_size)
        in_time_key = f"{key}/in_time"
        while not store.check([in_time_key]):
            sleep_unless_aborted(POLL_S, "a round was closing")
        return position < CLOSED, int(store.get(in_time_key))

    def _close_when_due(self, store: dist.Store, key: str, world_size: int) -> None:
        needed = math.ceil(self.quorum * world_size - 1e-9)
        started = time.monotonic()
        while store.add(key, 0) < needed:
            if self.deadline_s is not None and time.monotonic() - started >= self.deadline_s:
                break
            sleep_unless_aborted(POLL_S, "a round was closing")
        in_time = store.add(key, CLOSED) - CLOSED
        store.set(f"{key}/in_time", str(in_time))


"""An emulated slow link: collectives are paced as if every worker's uplink ran at a fixed rate.

Real bandwidth caps need root and network namespaces (benchmarks/cluster); this pacing lets the
demo and tests on localhost feel a slow link anywhere. The link is serial: a collective starts
when the previous one has finished sending.
"""

from __future__ import annotations

import time


def ring_wire_bytes(kind: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one worker sends for a collective over a ring of ``world_size`` workers."""
    if world_size <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (world_size - 1) * payload_bytes // world_size
    if kind == "all_gather":
        return (world_size - 1) * payload_bytes
    if kind == "broadcast":
        return payload_bytes
    raise ValueError(f"unknown collective {kind!r}")


class LinkEmulator:
    """Holds each collective until the bytes it put on the wire would have been sent."""

    def __init__(self, mbit_per_s: float):
        if mbit_per_s <= 0:
            raise ValueError(f"link rate must be positive, got {mbit_per_s} Mbit/s")
        self.bytes_per_s = mbit_per_s * 1e6 / 8
        self._free_at = 0.0

    def reserve(self, wire_bytes: int) -> float:
        """Book the link for ``wire_bytes``; returns the time at which they are sent."""
        start = max(time.monotonic(), self._free_at)
        self._free_at = start + wire_bytes / self.bytes_per_s
        return self._free_at

    @staticmethod
    def wait_until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)

"""Rate-limited warnings: a flood of like warnings costs one line, then one summary per window."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass


@dataclass
class _Run:
    since: float  # when the current window opened
    count: int  # warnings held back in it
    latest: str


class Throttle:
    """Logs the first warning of a kind at once, then at most one summary per ``every_s`` seconds."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger = logger
        self.every_s = every_s
        self._runs: dict[str, _Run] = {}

    def warning(self, kind: str, text: str, now: float | None = None) -> None:
        """Log ``text``, or count it if a warning of this ``kind`` was logged in this window."""
        now = time.monotonic() if now is None else now
        run = self._runs.get(kind)
        if run is None:
            self.logger.warning("%s", text)
            self._runs[kind] = _Run(now, 0, text)
        else:
            run.count, run.latest = run.count + 1, text
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Summarise the warnings held back in every window that has closed."""
        now = time.monotonic() if now is None else now
        for kind, run in list(self._runs.items()):
            if now - run.since < self.every_s:
                continue
            if run.count:
                self.logger.warning("%d more like it in the last %.0f s, the latest: %s", run.count, now - run.since, run.latest)
                self._runs[kind] = _Run(now, 0, run.latest)
            else:
                del self._runs[kind]

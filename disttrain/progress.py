"""Progress of a run: a terminal bar that log lines do not overwrite, or progress lines for a parent.

A worker started by ``disttrain train --nproc N`` or the demo does not draw on the terminal it
shares with other workers: it writes progress lines to stderr, and the launcher, which relays
every worker's output, draws the one bar (see ``disttrain.launcher.local``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PROGRESS_ENV = "DISTTRAIN_PROGRESS"  # "lines": report progress to the launcher instead of drawing a bar
PROGRESS_PREFIX = "disttrain-progress "
LINE_INTERVAL_S = 0.5


class Progress(Protocol):
    def update(self, step: int, **postfix: str) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """Progress that shows nothing (workers other than rank 0)."""

    def update(self, step: int, **postfix: str) -> None:
        pass

    def close(self) -> None:
        pass


class TerminalBar:
    """A tqdm bar; while it is open, log records are written above it instead of across it."""

    def __init__(self, total: int, initial: int, desc: str):
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm())
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=None)  # None: only on a terminal

    def update(self, step: int, **postfix: str) -> None:
        self._bar.n = step
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
        self._redirect.close()


class ProgressLines:
    """Progress as ``disttrain-progress {json}`` lines on stderr, at most every LINE_INTERVAL_S."""

    def __init__(self, total: int, initial: int, desc: str):
        self._head = {"total": total, "desc": desc}
        self._last = 0.0
        self._write({"step": initial})

    def _write(self, state: dict[str, Any]) -> None:
        sys.stderr.write(PROGRESS_PREFIX + json.dumps({**self._head, **state}) + "\n")
        sys.stderr.flush()
        self._last = time.monotonic()

    def update(self, step: int, **postfix: str) -> None:
        if time.monotonic() - self._last >= LINE_INTERVAL_S or step >= self._head["total"]:
            self._write({"step": step, "postfix": postfix})

    def close(self) -> None:
        pass


def progress_for(shown: bool, total: int, initial: int, desc: str) -> Progress:
    """The progress display of this process: nothing, progress lines for the launcher, or a bar."""
    if not shown:
        return NoProgress()
    if os.environ.get(PROGRESS_ENV) == "lines":
        return ProgressLines(total, initial, desc)
    return TerminalBar(total, initial, desc)


def parse_progress(line: str) -> dict[str, Any] | None:
    """The state a progress line carries, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None

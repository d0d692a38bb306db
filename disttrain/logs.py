"""One log format for every process (coordinator, launcher, workers), with a short tag per process."""

from __future__ import annotations

import logging
from typing import Callable

FORMAT = "%(asctime)s.%(msecs)03d %(process_tag)s %(levelname)s %(name)s: %(message)s"  # milliseconds: recovery times are read from them
DATE_FORMAT = "%H:%M:%S"


class TaggedFormatter(logging.Formatter):
    """Formats records with this process's tag (``w0``, ``w3f9a``, ``main`` ...)."""

    tag: Callable[[], str] = staticmethod(lambda: "main")

    def format(self, record: logging.LogRecord) -> str:
        record.process_tag = TaggedFormatter.tag()
        return super().format(record)


def setup_logging(tag: str, level: int = logging.INFO) -> None:
    """Timestamped logs on stderr, tagged with ``tag``; replaces any earlier configuration."""
    handler = logging.StreamHandler()
    handler.setFormatter(TaggedFormatter(FORMAT, DATE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    set_tag(tag)


def set_tag(tag: str | Callable[[], str]) -> None:
    """Name this process in its log lines from now on: a name, or a function that gives the current one
    (an elastic worker learns its name after it starts, and takes a new one when it rejoins)."""
    TaggedFormatter.tag = staticmethod(tag if callable(tag) else lambda: tag)

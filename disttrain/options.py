"""Config fields that carry their own one-line help, which the CLI and docs/configuration.md show."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def option(default: Any, help: str, group: str = "") -> Any:
    """A config field with a default, a one-line description and, optionally, the group of flags it is shown in."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


def section(factory: Callable[[], Any], help: str) -> Any:
    """A nested config dataclass: its fields become one group of flags (``--section.field``)."""
    return dataclasses.field(default_factory=factory, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    """The field's one-line description."""
    return field.metadata.get("help", "")


def group_of(field: dataclasses.Field) -> str:
    """The title of the group of flags the field is shown in ("" for its section's own group)."""
    return field.metadata.get("group", "")

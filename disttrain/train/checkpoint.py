"""Checkpoints written atomically: a temporary file in the same folder, fsync, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """A reader sees the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint with its tensors on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    return torch.load(path, map_location=device, weights_only=False)


def shared_path(directory: str | Path) -> Path:
    """Model, optimizer and step: identical on every worker, written by rank 0."""
    return Path(directory) / "checkpoint.pt"


def worker_path(directory: str | Path, rank: int) -> Path:
    """Per-worker state (error-feedback residuals), written by each worker."""
    return Path(directory) / f"worker-{rank}.pt"

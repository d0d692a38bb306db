"""Where a collective's tensors must live: on the GPU for NCCL, on the CPU for Gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device that small control tensors (digests, sizes, flags) need for ``group``'s backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_type(name: str) -> str:
    """'cuda' or 'cpu' for a --device choice (``auto``: 'cuda' when torch sees a GPU), without touching
    the GPU; a ValueError naming the fix for 'cuda' on a machine without one."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` is this process's GPU when torch sees one (LOCAL_RANK picks it), else the CPU."""
    if device_type(name) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())

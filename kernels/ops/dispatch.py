"""Which implementation runs: the Triton kernel for CUDA tensors, the torch reference otherwise.

``DISTTRAIN_KERNELS=auto|triton|torch`` (read at every call) overrides that choice, and the
``backend(...)`` context manager overrides both; tests use it to force the Triton kernels on CPU
tensors, which works under Triton's interpreter (TRITON_INTERPRET=1 before the first import).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Literal, TypeVar, cast

import torch

from disttrain.kernels import _triton

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[Backend, ...] = ("auto", "triton", "torch")
ENV_VAR = "DISTTRAIN_KERNELS"
F = TypeVar("F", bound=Callable[..., Any])

_forced: ContextVar[Backend | None] = ContextVar("disttrain_kernels_backend", default=None)


def _checked(name: str, source: str) -> Backend:
    """``name`` as a Backend, or a ValueError naming where it came from."""
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; use 'auto', 'triton' or 'torch'")
    return cast(Backend, name)


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Run the kernels called inside on ``name`` (this wins over DISTTRAIN_KERNELS)."""
    token = _forced.set(_checked(name, "kernels.backend()"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested() -> Backend:
    """The backend asked for: the innermost ``backend(...)``, else DISTTRAIN_KERNELS, else 'auto'."""
    forced = _forced.get()
    return forced if forced is not None else _checked(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def use_triton(device: torch.device) -> bool:
    """Whether a kernel whose data is on ``device`` runs in Triton."""
    choice = requested()
    if choice == "torch":
        return False
    if choice == "auto":
        return device.type == "cuda" and _triton.available()
    if not _triton.available():
        raise RuntimeError("the Triton kernel backend needs triton: pip install 'disttrain[gpu]'")
    if device.type != "cuda" and not _triton.interpreted():
        raise RuntimeError(
            f"the Triton kernel backend got {device.type} tensors: Triton compiles for CUDA; to run the "
            "kernels on CPU, set TRITON_INTERPRET=1 before disttrain is first imported"
        )
    return True


def _device(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    """The device of the first tensor argument, else the ``device`` argument, else the CPU."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device(signature.bind(*args, **kwargs).arguments.get("device", "cpu"))


def dispatched(reference: F, kernel: F) -> F:
    """One function with ``reference``'s signature that runs ``kernel`` wherever ``use_triton`` says so."""
    signature = inspect.signature(reference)

    @functools.wraps(reference)
    def run(*args: Any, **kwargs: Any) -> Any:
        chosen = kernel if use_triton(_device(signature, args, kwargs)) else reference
        return chosen(*args, **kwargs)

    run.__name__ = run.__qualname__ = reference.__name__.removesuffix("_torch")
    return cast(F, run)

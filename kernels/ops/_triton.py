"""Triton when it is installed, and the two decorators every kernel module uses either way.

Without triton the decorators return the Python function unchanged, so the kernel modules
still import (and their torch references still run); the dispatch layer refuses the Triton
backend with a clear message before any kernel could be launched.

Triton chooses between compiling and interpreting (TRITON_INTERPRET=1) when a kernel is
decorated, that is when disttrain.kernels is first imported; ``interpreted()`` reports that
choice, whatever the environment says later.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: references only
    triton = None
    tl = None

F = TypeVar("F", bound=Callable[..., Any])

# Autotuning runs each candidate for ~25 ms instead of Triton's default ~125 ms.
_TUNING_WARMUP_MS, _TUNING_REP_MS = 5, 20


def available() -> bool:
    """Whether triton imported."""
    return triton is not None


# Read once, when the kernel modules (which import this one first) are decorated.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def jit(**options: Any) -> Callable[[F], F]:
    """``triton.jit(**options)``; the identity without triton."""
    return triton.jit(**options) if triton is not None else lambda fn: fn


def _tuning_bench(kernel_call: Callable[[], Any], quantiles: tuple[float, ...]) -> Any:
    """Triton's do_bench with shorter warm-up and repetition times."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=_TUNING_WARMUP_MS, rep=_TUNING_REP_MS, quantiles=quantiles)


def autotune(
    configs: list[dict[str, int]], interpreter_config: dict[str, int], key: list[str], **options: Any
) -> Callable[[F], F]:
    """``triton.autotune`` over ``configs`` (block sizes plus num_warps/num_stages).

    Under the interpreter only ``interpreter_config`` is used: a single config is never
    benchmarked, and the interpreter is far too slow to benchmark anything.
    """
    if triton is None:
        return lambda fn: fn
    chosen = [interpreter_config] if interpreted() else configs
    return triton.autotune(
        configs=[_config(entry) for entry in chosen], key=key, do_bench=_tuning_bench, **options
    )


def _config(entry: dict[str, int]) -> Any:
    """A triton.Config from one flat dict."""
    meta = {name: value for name, value in entry.items() if name not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 3))

"""The registry of methods: named combinations of compressor, optimizer and schedule.

The CLI, the demo and the benchmarks pick methods by name, so a new method plugs in here
without touching the data path.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from disttrain.compress.factory import CompressionSpec

Engine = Literal["disttrain", "ddp_powersgd", "ddp_hook"]
OptimizerKind = Literal["adamw", "projected_adamw"]


@dataclass(frozen=True)
class Method:
    """How gradients are exchanged and applied.

    engine "disttrain" uses CompressedAllReduce; "ddp_powersgd" is torch DDP with torch's
    powerSGD_hook (the baseline); "ddp_hook" is torch DDP with disttrain_hook.
    optimizer "adamw" reconstructs the averaged gradient for torch AdamW; "projected_adamw"
    keeps Adam moments in the projected space (GaLore).
    """

    name: str
    summary: str
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    optimizer: OptimizerKind = "adamw"
    engine: Engine = "disttrain"
    powersgd_rank: int = 4


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown method {name!r}; choose one of: {known}") from None


def with_overrides(method: Method, **compression: object) -> Method:
    """The method with some compression fields replaced (None values are ignored)."""
    changes = {k: v for k, v in compression.items() if v is not None}
    return replace(method, compression=replace(method.compression, **changes)) if changes else method


_SVD = CompressionSpec(basis="svd", rank=8, refresh_every=200, error_feedback=True)
_SEEDED = CompressionSpec(basis="seeded", rank=8, refresh_every=1, error_feedback=True)
_SEEDED_FIXED = CompressionSpec(basis="seeded", rank=8, refresh_every=200, error_feedback=False)

register(Method("dense", "fp32 all-reduce of full gradients + AdamW (what DDP sends)", CompressionSpec(basis="dense")))
register(Method("powersgd-r4", "torch DDP + powerSGD_hook rank 4, one bucket (the baseline)", engine="ddp_powersgd"))
register(Method("svd-projected", "GaLore: SVD basis r=8 every 200 steps, Adam moments in the subspace", replace(_SVD, error_feedback=False), "projected_adamw"))
register(Method("svd-reconstruct", "SVD basis r=8 every 200 steps, error feedback, AdamW on the reconstruction", _SVD))
register(Method("svd-int8-reconstruct", "SVD basis r=8, int8 payload, error feedback, AdamW on the reconstruction", replace(_SVD, payload="int8")))
register(Method("seeded-projected", "seeded Gaussian basis r=8 every 200 steps, Adam moments in the subspace", _SEEDED_FIXED, "projected_adamw"))
register(Method("seeded-reconstruct", "seeded Gaussian basis r=8 redrawn every step, error feedback, AdamW", _SEEDED))
register(Method("seeded-int8-projected", "seeded basis r=8 every 200 steps, int8 payload, Adam moments in the subspace", replace(_SEEDED_FIXED, payload="int8"), "projected_adamw"))
register(Method("seeded-int8-reconstruct", "seeded basis r=8 redrawn every step, int8, error feedback, AdamW", replace(_SEEDED, payload="int8")))
register(Method("ddp-hook", "torch DDP + disttrain_hook (seeded basis r=8, int8, error feedback)", replace(_SEEDED, payload="int8"), engine="ddp_hook"))

DEFAULT_METHOD = "svd-int8-reconstruct"

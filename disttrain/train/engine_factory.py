"""Which engine runs a method: the one place that maps a method's engine name to its class."""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.methods import Method
from disttrain.train.config import TrainConfig
from disttrain.train.engines import DDPEngine, DisttrainEngine, Engine
from disttrain.train.local_steps import LocalStepsEngine
from disttrain.train.zeroth_order_engine import ZerothOrderEngine


def build_engine(
    model: torch.nn.Module, method: Method, config: TrainConfig, group=None, elastic: bool = False
) -> Engine:
    """The engine of ``method`` for ``model`` (elastic: under a coordinator's changing generations)."""
    if method.engine == "disttrain":
        return DisttrainEngine(model, method, config, group, elastic)
    if method.engine == "local_steps":
        return LocalStepsEngine(model, method, config, group, elastic)
    if method.engine == "zeroth_order":
        return ZerothOrderEngine(model, config, group)
    if method.traits.torch_ddp:
        if not dist.is_initialized():
            raise RuntimeError(f"method {method.name!r} needs an initialised process group (torch DDP)")
        return DDPEngine(model, method, config, group)
    raise ValueError(f"unknown engine {method.engine!r} in method {method.name!r}")

"""Which exchange runs a method: the one place that maps a method's engine to its class."""

from __future__ import annotations

import torch

from disttrain.exchange.base import Exchange, ExchangeOptions
from disttrain.comm.layout import NodeLayout
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.exchange.node_rounds import node_rounds
from disttrain.exchange.overlapped_rounds import OverlappedRoundsExchange
from disttrain.exchange.per_step import PerStepExchange
from disttrain.exchange.torch_ddp import TorchDDPExchange
from disttrain.exchange.zeroth_order import ZerothOrderExchange
from disttrain.methods import Method


def build_exchange(model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions) -> Exchange:
    """The exchange of ``method`` for ``model`` trained by ``optimizer``."""
    if isinstance(options.layout, NodeLayout):
        if not method.makes_nodes:
            raise ValueError(f"inner 'ddp' or 'fsdp' cannot run method {method.name!r}: {method.why_no_nodes()}, or inner 'flat'")
        return node_rounds(model, optimizer, method, options, options.layout)
    if method.engine == "disttrain":
        return PerStepExchange(model, optimizer, method, options)
    if method.engine == "local_steps":
        return LocalRoundsExchange(model, optimizer, method, options)
    if method.engine == "overlapped_rounds":
        return OverlappedRoundsExchange(model, optimizer, method, options)
    if method.engine == "zeroth_order":
        return ZerothOrderExchange(model, optimizer, method, options)
    if method.traits.torch_ddp:
        return TorchDDPExchange(model, optimizer, method, options)
    raise ValueError(f"unknown engine {method.engine!r} in method {method.name!r}")

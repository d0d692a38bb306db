"""Shared-seed zeroth-order steps as an exchange: two forward passes, no backward, one int8 byte per worker.

The optimizer (a plain SGD over the trainable weights) only holds the learning rate a schedule
writes; the update itself is rebuilt from every worker's (seed, code) with ``zeroth_order.lr``
scaled by that schedule relative to the optimizer's starting lr.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.link import ring_wire_bytes
from disttrain.exchange.base import Closure, EveryStepAgrees, ExchangeOptions, peak_lr_of, require_closure
from disttrain.federated.zeroth_order import ZOState, zo_step
from disttrain.methods import Method


class ZerothOrderExchange(EveryStepAgrees):
    """Runs ``zo_step`` on every step with the loss closure the step is given."""

    needs_closure = True
    reducer = None

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions):
        self.model = self.module = model
        self.optimizer = optimizer
        self.group = options.group
        self.method_name = method.name
        self.zo = options.zeroth_order
        self.peak_lr = peak_lr_of(optimizer)
        self.state = ZOState(self.zo, options.seed, group=options.group)
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.last_loss = float("nan")

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError(f"method {self.method_name!r} runs no backward, so there is nothing to accumulate")

    def synchronize(self) -> None:
        pass

    def step(self, step: int, closure: Closure | None = None) -> bool:
        loss_of = require_closure(closure, self.method_name)
        scheduled = self.optimizer.param_groups[0]["lr"] / self.peak_lr
        self.state.config = replace(self.zo, lr=self.zo.lr * scheduled)
        self.state.step = step
        result = zo_step(self.model, lambda model, batch: loss_of(), None, self.state)
        self.last_loss = result.loss
        self.payload_bytes_last_step = result.bytes_sent
        world_size = dist.get_world_size(self.state.group) if dist.is_initialized() else 1
        self.wire_bytes_last_step = ring_wire_bytes("all_gather", result.bytes_sent, world_size)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}  # directions and codes are functions of (seed, step, rank)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def shared_state_dict(self) -> dict[str, Any]:
        return {}

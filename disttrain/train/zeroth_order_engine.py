"""The trainer's engine for shared-seed zeroth-order steps: one byte per worker per step."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from disttrain.comm.link import ring_wire_bytes
from disttrain.federated.zeroth_order import ZOState, zo_step
from disttrain.train.config import TrainConfig
from disttrain.train.engines import PerStepMembership, forward_loss
from disttrain.train.task import Batch


class ZerothOrderEngine(PerStepMembership):
    """Runs ``zo_step`` on every step: two forward passes, no backward, one int8 code exchanged.

    ``optimizer`` is a plain SGD over the trainable weights that only holds the learning rate the
    trainer's schedule writes (warm-up and cosine relative to ``optim.lr``); the update itself is
    rebuilt from every worker's (seed, code) with ``zeroth_order.lr`` scaled by that schedule.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, group=None):
        self.model = model
        self.precision = config.precision
        self.zo = config.zeroth_order
        self.peak_lr = config.peak_lr
        self.state = ZOState(self.zo, config.seed, group=group)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=config.peak_lr)
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in trainable)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0

    def step(self, step: int, batch: Batch) -> float:
        scheduled = self.optimizer.param_groups[0]["lr"] / self.peak_lr
        self.state.config = replace(self.zo, lr=self.zo.lr * scheduled)
        self.state.step = step
        result = zo_step(self.model, lambda model, b: forward_loss(model, b, self.precision), batch, self.state)
        self.payload_bytes_last_step = result.bytes_sent
        world_size = dist.get_world_size(self.state.group) if dist.is_initialized() else 1
        self.wire_bytes_last_step = ring_wire_bytes("all_gather", result.bytes_sent, world_size)
        return result.loss

    def state_dict(self) -> dict:
        return {}

    def shared_state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: directions and codes are functions of (seed, step, rank)."""

"""torch DDP as an exchange: the baselines (dense all-reduce, torch's powerSGD_hook) and disttrain_hook.

Forward passes go through the DDP wrapper (``module``), whose backward all-reduces in one bucket;
the step is the optimizer's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm.ddp_hook import DisttrainHookState, disttrain_hook
from disttrain.comm.link import ring_wire_bytes
from disttrain.compress.base import load_compressor_states
from disttrain.exchange.base import Closure, EveryStepAgrees, ExchangeOptions
from disttrain.methods import Method


def powersgd_payload_bytes(model: torch.nn.Module, state: powersgd.PowerSGDState) -> int:
    """Bytes powerSGD_hook puts into its collectives this step, by its own compression rule."""
    total = 0
    compressing = state.iter >= state.start_powerSGD_iter
    for p in model.parameters():
        if compressing and p.dim() >= 2:
            rows, cols = p.shape[0], p[0].numel()
            worth, _, compressed = powersgd._should_compress(
                rows, cols, state.matrix_approximation_rank, state.min_compression_rate
            )
            if worth:
                total += compressed * 4
                continue
        total += p.numel() * 4
    return total


class TorchDDPExchange(EveryStepAgrees):
    """torch DDP with one bucket and, for the compressed baselines, a comm hook: powerSGD_hook or disttrain_hook."""

    needs_closure = False
    reducer = None

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions):
        if not dist.is_initialized():
            raise RuntimeError(f"method {method.name!r} needs an initialised process group (torch DDP)")
        self.model = model
        self.optimizer = optimizer
        self.group = options.group
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in model.parameters())
        # One bucket: several powerSGD buckets in flight can issue collectives in different
        # orders on different ranks over a slow link (see docs/design.md).
        # init_sync=False: the Session's membership already started every rank from rank 0's state,
        # sending it only where it differed (on a slow link the model is worth not sending twice).
        self.module = DistributedDataParallel(model, process_group=options.group, bucket_cap_mb=1024, init_sync=False)
        self.world_size = dist.get_world_size(options.group)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.hook_state: DisttrainHookState | None = None
        self.powersgd_state: powersgd.PowerSGDState | None = None
        if method.engine == "ddp":
            self.payload_bytes_last_step = self.dense_bytes_per_step
            self.wire_bytes_last_step = ring_wire_bytes("all_reduce", self.dense_bytes_per_step, self.world_size)
        elif method.engine == "ddp_powersgd":
            self.powersgd_state = powersgd.PowerSGDState(
                process_group=options.group,
                matrix_approximation_rank=method.powersgd_rank,
                start_powerSGD_iter=2,
                random_seed=options.seed,
            )
            self.module.register_comm_hook(self.powersgd_state, powersgd.powerSGD_hook)
        else:
            self.hook_state = DisttrainHookState(model.parameters(), method.compression, options.seed, options.group)
            self.module.register_comm_hook(self.hook_state, disttrain_hook)
        self._count_from = (0, 0)
        self._before_backward()

    def _before_backward(self) -> None:
        """Note what the coming backward's bytes are counted from: powerSGD's rule reads its state
        before the hook advances it, disttrain_hook's counters are read after."""
        if self.powersgd_state is not None:
            payload = powersgd_payload_bytes(self.model, self.powersgd_state)
            self._count_from = (payload, ring_wire_bytes("all_reduce", payload, self.world_size))
        if self.hook_state is not None:
            self._count_from = (self.hook_state.payload_bytes, self.hook_state.wire_bytes)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.module.no_sync()

    def synchronize(self) -> None:
        pass  # DDP's backward leaves the averaged gradients in .grad

    def step(self, step: int, closure: Closure | None = None) -> bool:
        if self.powersgd_state is not None:
            self.payload_bytes_last_step, self.wire_bytes_last_step = self._count_from
        if self.hook_state is not None:
            self.payload_bytes_last_step = self.hook_state.payload_bytes - self._count_from[0]
            self.wire_bytes_last_step = self.hook_state.wire_bytes - self._count_from[1]
        self.optimizer.step()
        self._before_backward()
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.hook_state is None:
            return {}
        return {"compressors": [c.state_dict() for c in self.hook_state.compressors], "step": self.hook_state.step}

    def shared_state_dict(self) -> dict[str, Any]:
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.hook_state is not None and state:
            load_compressor_states(self.hook_state.compressors, state["compressors"])
            self.hook_state.step = state["step"]

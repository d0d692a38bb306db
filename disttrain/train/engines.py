"""Engines: how one training step's gradients are exchanged and applied.

DisttrainEngine runs disttrain's CompressedAllReduce. DDPEngine wraps the model in torch DDP
with a comm hook: torch's powerSGD_hook (the baseline) or disttrain_hook.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm.allreduce import CompressedAllReduce
from disttrain.comm.ddp_hook import DisttrainHookState, disttrain_hook
from disttrain.comm.link import LinkEmulator, ring_wire_bytes
from disttrain.compress.base import load_compressor_states
from disttrain.methods import PROJECTED_OPTIMIZERS, Method
from disttrain.optim.lowrank_orthogonal import LowRankOrthogonal
from disttrain.optim.projected_adamw import CoefficientSource, ProjectedAdamW
from disttrain.train.config import TrainConfig
from disttrain.train.task import Batch


class Engine(Protocol):
    optimizer: torch.optim.Optimizer  # the optimizer whose learning rate follows the schedule
    payload_bytes_last_step: int  # what this worker put into collectives in the last step
    wire_bytes_last_step: int  # what those collectives moved per worker (an all_gather receives W-1 payloads)
    dense_bytes_per_step: int
    in_sync: bool  # whether every replica holds the same weights after the last step

    def membership_check_due(self, step: int, sync_every: int) -> bool:
        """Whether elastic members compare generations before step ``step``."""

    def replica_parameters(self) -> list[torch.Tensor]:
        """The weights every member must agree on (what a joiner receives)."""

    def step(self, step: int, batch: Batch) -> float:
        """Forward, backward, exchange and update; returns this worker's training loss."""

    def state_dict(self) -> dict:
        """Per-worker exchange state (error-feedback residuals, bases)."""

    def shared_state_dict(self) -> dict:
        """The exchange state every worker holds identically (bases), for joiners."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() or shared_state_dict() returned."""


def forward_outputs(model: torch.nn.Module, batch: Batch, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, loss) of ``model`` on ``batch``, under bf16 autocast when asked.

    A tuple batch is (inputs, targets) for the small GPT; a dict batch goes to a Hugging Face
    model as keyword arguments, ``labels`` included.
    """
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    with torch.autocast(first.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if isinstance(batch, dict):
            output = model(**batch)
            return output.logits, batch["labels"], output.loss
        logits, loss = model(*batch)
        return logits, batch[1], loss


def forward_loss(model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
    """The model's loss on ``batch``."""
    return forward_outputs(model, batch, precision)[2]


def build_optimizer(params, method: Method, config: TrainConfig, source: CoefficientSource | None = None) -> torch.optim.Optimizer:
    """torch AdamW, plain SGD, or an optimizer reading averaged coefficients from ``source``
    (ProjectedAdamW, LowRankOrthogonal); hyper-parameters from the config."""
    o = config.optim
    if method.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.peak_lr, weight_decay=o.weight_decay)
    if method.optimizer not in PROJECTED_OPTIMIZERS:
        return torch.optim.AdamW(params, lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    scale = method.galore_scale if o.galore_scale is None else o.galore_scale
    kind = LowRankOrthogonal if method.optimizer == "orthogonal" else ProjectedAdamW
    return kind(
        params, lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, scale=scale, source=source,
        refresh_moments=method.refresh_moments,
    )


class PerStepMembership:
    """Elastic hooks of engines whose replicas agree after every step."""

    model: torch.nn.Module
    in_sync = True

    def membership_check_due(self, step: int, sync_every: int) -> bool:
        return step % sync_every == 0

    def replica_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())


class DisttrainEngine(PerStepMembership):
    """CompressedAllReduce feeding torch AdamW (reconstruct) or ProjectedAdamW."""

    def __init__(self, model: torch.nn.Module, method: Method, config: TrainConfig, group=None, elastic: bool = False):
        self.model = model
        self.precision = config.precision
        link = LinkEmulator(config.link_mbit) if config.link_mbit else None
        self.reducer = CompressedAllReduce(
            model.parameters(),
            method.compression,
            config.seed,
            group,
            overlap=config.overlap,
            link=link,
            fixed_membership=not elastic,
        )
        self.projected = method.optimizer in PROJECTED_OPTIMIZERS
        self.optimizer = build_optimizer(model.parameters(), method, config, source=self.reducer)
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step

    @property
    def payload_bytes_last_step(self) -> int:
        return self.reducer.payload_bytes_last_step

    @property
    def wire_bytes_last_step(self) -> int:
        return self.reducer.wire_bytes_last_step

    def step(self, step: int, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.reducer.start_step(step)
        loss = forward_loss(self.model, batch, self.precision)
        loss.backward()
        self.reducer.finish()
        if not self.projected:
            self.reducer.write_gradients()
        self.optimizer.step()
        self.reducer.commit()
        return loss.item()

    def state_dict(self) -> dict:
        return self.reducer.state_dict()

    def shared_state_dict(self) -> dict:
        return self.reducer.shared_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reducer.load_state_dict(state)


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


class DDPEngine(PerStepMembership):
    """torch DDP with one bucket and, for the compressed baselines, a comm hook: powerSGD_hook or disttrain_hook."""

    def __init__(self, model: torch.nn.Module, method: Method, config: TrainConfig, group=None):
        self.model = model
        self.precision = config.precision
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in model.parameters())
        # One bucket: several powerSGD buckets in flight can issue collectives in different
        # orders on different ranks over a slow link (see DESIGN.md).
        self.ddp = DistributedDataParallel(model, process_group=group, bucket_cap_mb=1024)
        self.optimizer = build_optimizer(self.ddp.parameters(), method, config)
        self.world_size = dist.get_world_size(group)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.hook_state: DisttrainHookState | None = None
        self.powersgd_state: powersgd.PowerSGDState | None = None
        if method.engine == "ddp":
            self.payload_bytes_last_step = self.dense_bytes_per_step
            self.wire_bytes_last_step = ring_wire_bytes("all_reduce", self.dense_bytes_per_step, self.world_size)
        elif method.engine == "ddp_powersgd":
            self.powersgd_state = powersgd.PowerSGDState(
                process_group=group,
                matrix_approximation_rank=method.powersgd_rank,
                start_powerSGD_iter=2,
                random_seed=config.seed,
            )
            self.ddp.register_comm_hook(self.powersgd_state, powersgd.powerSGD_hook)
        else:
            self.hook_state = DisttrainHookState(model.parameters(), method.compression, config.seed, group)
            self.ddp.register_comm_hook(self.hook_state, disttrain_hook)

    def step(self, step: int, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.powersgd_state is not None:
            self.payload_bytes_last_step = powersgd_payload_bytes(self.model, self.powersgd_state)
            self.wire_bytes_last_step = ring_wire_bytes("all_reduce", self.payload_bytes_last_step, self.world_size)
        if self.hook_state is not None:
            before = (self.hook_state.payload_bytes, self.hook_state.wire_bytes)
        loss = forward_loss(self.ddp, batch, self.precision)
        loss.backward()
        if self.hook_state is not None:
            self.payload_bytes_last_step = self.hook_state.payload_bytes - before[0]
            self.wire_bytes_last_step = self.hook_state.wire_bytes - before[1]
        self.optimizer.step()
        return loss.item()

    def state_dict(self) -> dict:
        if self.hook_state is None:
            return {}
        return {"compressors": [c.state_dict() for c in self.hook_state.compressors], "step": self.hook_state.step}

    def shared_state_dict(self) -> dict:
        return self.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.hook_state is not None and state:
            load_compressor_states(self.hook_state.compressors, state["compressors"])
            self.hook_state.step = state["step"]

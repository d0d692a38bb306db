"""The training loop: one compressed exchange per step, evaluation, replica checks, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from disttrain.data.corpus import ByteCorpus
from disttrain.methods import get_method, with_overrides
from disttrain.models.gpt import GPT
from disttrain.train import checkpoint
from disttrain.train.config import TrainConfig
from disttrain.train.engines import build_engine
from disttrain.train.replica import broadcast_from_rank0, check_replicas

log = logging.getLogger(__name__)


class ConfigMismatch(ValueError):
    """Workers were started with different configs."""


@dataclass
class EvalPoint:
    step: int
    val_loss: float
    total_bytes: int
    wall_s: float


@dataclass
class RunSummary:
    workers: int
    steps: int
    method: str
    val_loss: float
    bytes_per_step: float
    dense_bytes_per_step: int
    total_bytes: int
    wall_s: float
    replicas_identical: bool
    history: list[EvalPoint] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        """The one-line JSON the demo and the launcher print."""
        fields = asdict(self)
        fields.pop("history")
        fields["compression_ratio"] = round(self.dense_bytes_per_step / max(self.bytes_per_step, 1e-9), 1)
        fields["val_loss"] = round(self.val_loss, 4)
        fields["bytes_per_step"] = round(self.bytes_per_step, 1)
        fields["wall_s"] = round(self.wall_s, 1)
        return fields


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            names += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            names.append(f"{prefix}{key} ({left!r} vs {right!r})")
    return names


def check_same_config(config: TrainConfig, group: dist.ProcessGroup | None = None) -> None:
    """Every worker must run the same config; compare fingerprints, then name the differences."""
    world = dist.get_world_size(group)
    fingerprints: list[Any] = [None] * world
    dist.all_gather_object(fingerprints, config.fingerprint(), group=group)
    if len(set(fingerprints)) == 1:
        return
    configs: list[Any] = [None] * world
    dist.all_gather_object(configs, config.to_dict(), group=group)
    problems = [
        f"rank {rank}: {', '.join(_differences(configs[0], other))}"
        for rank, other in enumerate(configs)
        if other != configs[0]
    ]
    raise ConfigMismatch(
        "workers were started with different configs (fields as rank 0 vs that rank): "
        + "; ".join(problems)
        + ". Start every worker with the same flags and config file."
    )


class Trainer:
    """Trains the small GPT on this worker's shard; all workers run it in lockstep."""

    def __init__(self, config: TrainConfig, group: dist.ProcessGroup | None = None, progress: bool = True):
        config.validate()
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        check_same_config(config, group)
        self.method = with_overrides(get_method(config.method), rank=config.rank, refresh_every=config.refresh_every)
        torch.manual_seed(config.seed)
        self.model = GPT(config.model)
        broadcast_from_rank0(self.model, group=group)
        self.corpus = ByteCorpus(config.data, config.seed)
        self.engine = build_engine(self.model, self.method, config, group)
        self.start_step = 0
        self.total_bytes = 0
        self.progress = progress and self.rank == 0
        if config.checkpoint_dir and checkpoint.shared_path(config.checkpoint_dir).is_file():
            self._resume()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation windows, split across workers."""
        self.model.eval()
        batches = self.corpus.val_batches()
        totals = torch.zeros(2, dtype=torch.float64)
        for index in range(self.rank, len(batches), self.world_size):
            _, loss = self.model(*batches[index])
            totals += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        dist.all_reduce(totals, group=self.group)
        self.model.train()
        return (totals[0] / totals[1]).item()

    def _save(self, step: int) -> None:
        directory = self.config.checkpoint_dir
        assert directory is not None
        checkpoint.save_atomic({"engine": self.engine.state_dict()}, checkpoint.worker_path(directory, self.rank))
        dist.barrier(group=self.group)
        if self.rank == 0:
            shared = {
                "step": step,
                "total_bytes": self.total_bytes,
                "fingerprint": self.config.fingerprint(include_runtime=False),
                "model": self.model.state_dict(),
                "optimizer": self.engine.optimizer.state_dict(),
            }
            checkpoint.save_atomic(shared, checkpoint.shared_path(directory))
        dist.barrier(group=self.group)

    def _resume(self) -> None:
        directory = self.config.checkpoint_dir
        assert directory is not None
        shared = checkpoint.load(checkpoint.shared_path(directory))
        if shared["fingerprint"] != self.config.fingerprint(include_runtime=False):
            raise ConfigMismatch(
                f"checkpoint in {directory!r} was written by a run with a different config; "
                "resume with the same flags or use a new --checkpoint_dir"
            )
        self.model.load_state_dict(shared["model"])
        self.engine.optimizer.load_state_dict(shared["optimizer"])
        worker = checkpoint.worker_path(directory, self.rank)
        if worker.is_file():
            self.engine.load_state_dict(checkpoint.load(worker)["engine"])
        self.start_step = shared["step"]
        self.total_bytes = shared["total_bytes"]
        log.info("resumed from %s at step %d", directory, self.start_step)

    def run(self, stop_at: int | None = None) -> RunSummary:
        """Train to config.steps (or stop early after step ``stop_at``) and summarise."""
        config = self.config
        last = config.steps if stop_at is None else min(stop_at, config.steps)
        started = time.monotonic()
        bytes_at_start = self.total_bytes
        history: list[EvalPoint] = []
        identical = True
        bar = tqdm(total=config.steps, initial=self.start_step, disable=not self.progress, desc=self.method.name)
        for step in range(self.start_step, last):
            for group in self.engine.optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss = self.engine.step(step, self.corpus.train_batch(step, self.rank, self.world_size))
            self.total_bytes += self.engine.payload_bytes_last_step
            done = step + 1
            if done % config.digest_every == 0 or done == last:
                identical &= check_replicas(self.model, self.engine.optimizer, self.group, step=done)
            if done % config.eval_every == 0 or done == last:
                history.append(EvalPoint(done, self.evaluate(), self.total_bytes, time.monotonic() - started))
                log.info("step %d: val loss %.4f, %d bytes sent", done, history[-1].val_loss, self.total_bytes)
            if config.checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0:
                self._save(done)
            bar.set_postfix(loss=f"{loss:.3f}", kB_per_step=f"{self.engine.payload_bytes_last_step / 1e3:.1f}")
            bar.update(1)
        bar.close()
        steps_run = max(1, last - self.start_step)
        val_loss = history[-1].val_loss if history else self.evaluate()
        return RunSummary(
            workers=self.world_size,
            steps=last,
            method=self.method.name,
            val_loss=val_loss,
            bytes_per_step=(self.total_bytes - bytes_at_start) / steps_run,
            dense_bytes_per_step=self.engine.dense_bytes_per_step,
            total_bytes=self.total_bytes,
            wall_s=time.monotonic() - started,
            replicas_identical=identical,
            history=history,
        )

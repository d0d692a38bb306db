"""The built-in training loop: a task's model and data around a disttrain.Session, with the schedule, evaluation and checkpoints."""

from __future__ import annotations

import functools
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.device import collective_device, resolve_device
from disttrain.comm.layout import shard_within_node
from disttrain.comm.waiting import wait_work
from disttrain.exchange.membership import FixedGroup, Membership
from disttrain.progress import progress_for
from disttrain.session import CheckpointMismatch, Session
from disttrain.train.config import TrainConfig
from disttrain.train.forward import forward_loss, forward_outputs
from disttrain.train.optimizer import build_optimizer
from disttrain.train.task import Batch, batch_to, build_task

log = logging.getLogger(__name__)


class ConfigMismatch(ValueError):
    """Workers were started with different configs."""


@dataclass
class EvalPoint:
    step: int
    val_loss: float
    accuracy: float  # top-1 on the validation set: next-byte accuracy for the GPT, the class for a classifier
    total_bytes: int
    wall_s: float


@dataclass
class RunSummary:
    workers: int  # members of the compressed exchange: processes, or nodes of several (--inner ddp)
    steps: int
    method: str
    val_loss: float
    accuracy: float
    bytes_per_step: float  # payload bytes this worker put into collectives, per step
    dense_bytes_per_step: int
    total_bytes: int
    wall_s: float
    replicas_identical: bool
    wire_bytes_per_step: float = 0.0  # what those collectives moved per worker (all_gather: W-1 payloads received)
    parameter_digest: str = ""
    processes_per_worker: int = 1
    held_bytes: dict[str, int] = field(default_factory=dict)  # what this process holds (Session.held_bytes), when in sync
    peak_rss_bytes: int = 0  # this process's peak resident memory
    history: list[EvalPoint] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        """The one-line JSON the demo and the launcher print."""
        fields = asdict(self)
        fields.pop("history")
        fields["compression_ratio"] = round(self.dense_bytes_per_step / max(self.bytes_per_step, 1e-9), 1)
        fields["val_loss"] = round(self.val_loss, 4)
        fields["accuracy"] = round(self.accuracy, 4)
        fields["bytes_per_step"] = round(self.bytes_per_step, 1)
        fields["wire_bytes_per_step"] = round(self.wire_bytes_per_step, 1)
        fields["wall_s"] = round(self.wall_s, 1)
        return fields


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * the peak lr at the last step."""
    o, peak = config.optim, config.peak_lr
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
    return peak * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


@dataclass
class DueWork:
    """Periodic work that has fallen due and waits for the replicas to agree. Registered with the
    session, so that a joiner receives it and does the same work at the same step as the others."""

    eval: bool = False
    checkpoint: bool = False
    marked: int = 0  # the last step whose work was marked (a joiner must not mark it again)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eval, self.checkpoint, self.marked = state["eval"], state["checkpoint"], state["marked"]


class ConfigCheck:
    """Registered with the session, so that a checkpoint or a donor from another config is refused."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.config.fingerprint(include_runtime=False)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.config.fingerprint(include_runtime=False):
            raise self.mismatch()

    def mismatch(self) -> ConfigMismatch:
        return ConfigMismatch(
            f"checkpoint in {self.config.checkpoint_dir!r} was written by a run with a different config; "
            "resume with the same flags or use a new --checkpoint_dir"
        )


class Trainer:
    """Trains the config's task (the small GPT, a federated classifier, or your --task) on this
    worker's shard: a loop around a disttrain.Session, like a user's own.

    With an elastic ``membership`` the session forms its process groups through the coordinator;
    a failed step is redone in the next generation inside the session.
    """

    def __init__(
        self,
        config: TrainConfig,
        group: dist.ProcessGroup | None = None,
        progress: bool = True,
        membership: Membership | None = None,
    ):
        config.validate()
        self.config = config
        self.group = group
        self.method = config.resolved_method()
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.task = build_task(config)
        config.lora.apply(self.task.model, config.seed)
        self.model = self.task.model.to(self.device)
        if config.inner == "fsdp":
            shard_within_node(self.model)  # before the optimizer, which must hold the shards
        members = membership or FixedGroup(group)
        if not members.elastic:
            check_same_config(config, group)  # under a coordinator, the job's fingerprint holds the config
        optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], self.method, config)
        config_check = ConfigCheck(config)
        try:
            self.session = Session(
                self.model, optimizer, self.method, seed=config.seed, group=group, total_steps=config.steps,
                link_mbit=config.link_mbit, check_every=config.digest_every, overlap=config.overlap,
                round_quorum=config.round_quorum, round_deadline_s=config.round_deadline_s,
                zeroth_order=config.zeroth_order, membership=members, resume_from=config.checkpoint_dir, inner=config.inner,
            )
        except CheckpointMismatch:
            raise config_check.mismatch() from None
        self.session.register_state("config", config_check)
        self._due = DueWork()
        self.session.register_state("due", self._due)
        self.start_step = self.session.steps  # where this process started or resumed
        self.progress = progress and self.rank == 0

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def step(self) -> int:
        return self.session.steps

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float] | None:
        """(mean validation loss over the fixed validation batches, top-1 accuracy), split across
        workers; None when a regroup brought a later state."""
        return self.session.collective(self._evaluate)

    def _evaluate(self) -> tuple[float, float]:
        self.model.eval()
        batches = self.task.val_batches()
        totals = torch.zeros(4, dtype=torch.float64, device=collective_device(self.group))
        # In lockstep every process runs as many forward passes as the busiest (the extras are not counted).
        end = -(-len(batches) // self.world_size) * self.world_size if self.session.layout.lockstep_forward else len(batches)
        for index in range(self.rank, end, self.world_size):
            logits, labels, loss = forward_outputs(self.model, self._on_device(batches[index % len(batches)]), self.config.precision)
            if index >= len(batches):
                continue
            correct = (logits.argmax(dim=-1) == labels).sum().item()
            totals += torch.tensor([loss.item(), 1.0, correct, labels.numel()], dtype=torch.float64, device=totals.device)
        wait_work(dist.all_reduce(totals, group=self.group, async_op=True))
        self.model.train()
        return (totals[0] / totals[1]).item(), (totals[2] / totals[3]).item()

    def _on_device(self, batch: Batch) -> Batch:
        return batch_to(batch, self.device)

    def _loss(self, step: int) -> torch.Tensor:
        """This worker's loss on its batch of ``step`` (rank and world size as they are now: after a regroup, the new ones)."""
        batch = self._on_device(self.task.train_batch(step, self.rank, self.world_size))
        return forward_loss(self.session.module, batch, self.config.precision)

    # --- the loop -----------------------------------------------------------------------
    def _periodic(self, history: list[EvalPoint], last: int, started: float) -> None:
        """Evaluation and checkpoint due at the step reached, run at the top of the loop (where a
        joiner starts too). With local-step
        rounds the replicas agree only at round ends, so what falls due mid-round waits for the next one."""
        config, done, due = self.config, self.step, self._due
        if done > due.marked:  # once per step; the mark travels to joiners with the flags
            due.eval |= done % config.eval_every == 0 or done == last
            due.checkpoint |= bool(config.checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0)
            due.marked = done
        if not self.session.in_sync:
            return
        if due.eval and (result := self.evaluate()) is not None:
            history.append(EvalPoint(done, *result, self.session.total_bytes, time.monotonic() - started))
            log.info("step %d: val loss %.4f, accuracy %.4f, %d bytes sent", done, *result, self.session.total_bytes)
            due.eval = False
        if due.checkpoint:
            assert config.checkpoint_dir is not None
            self.session.save(config.checkpoint_dir)
            due.checkpoint = False

    def run(self, stop_at: int | None = None) -> RunSummary:
        """Train to config.steps (or stop early after step ``stop_at``) and summarise."""
        config, session = self.config, self.session
        stop_at = config.stop_at if stop_at is None else stop_at
        last = config.steps if stop_at is None else min(stop_at, config.steps)
        started = time.monotonic()
        history: list[EvalPoint] = []
        bar = progress_for(self.progress, last, self.step, self.method.name)
        while self.step < last:
            self._periodic(history, last, started)
            step = self.step
            for group in session.optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss = session.step(functools.partial(self._loss, step))
            shown = {"loss": f"{loss:.3f}"} if loss is not None else {}
            bar.update(self.step, **shown, kB_per_step=f"{session.bytes_last_step / 1e3:.1f}")
        bar.close()
        self._periodic(history, last, started)
        final = (history[-1].val_loss, history[-1].accuracy) if history and history[-1].step == self.step else self.evaluate()
        if self.step >= config.steps:
            session.finish()
        val_loss, accuracy = final if final is not None else (math.nan, math.nan)
        return RunSummary(
            workers=session.layout.workers,
            processes_per_worker=session.layout.processes_per_worker,
            steps=self.step,
            method=self.method.name,
            val_loss=val_loss,
            accuracy=accuracy,
            bytes_per_step=session.bytes_per_step,
            dense_bytes_per_step=session.dense_bytes_per_step,
            total_bytes=session.total_bytes,
            wall_s=time.monotonic() - started,
            replicas_identical=session.replicas_identical,
            wire_bytes_per_step=session.wire_bytes_per_step,
            parameter_digest=session.parameters_digest()[:16],
            held_bytes=session.held_bytes() if session.in_sync else {},
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            history=history,
        )

"""The training loop: one compressed exchange per step, evaluation, replica checks, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.device import collective_device, resolve_device
from disttrain.comm.waiting import wait_work
from disttrain.elastic.membership import ElasticMembership
from disttrain.elastic.transfer import synchronise
from disttrain.progress import progress_for
from disttrain.train import checkpoint
from disttrain.train.config import TrainConfig
from disttrain.train.engine_factory import build_engine
from disttrain.train.engines import forward_outputs
from disttrain.train.replica import broadcast_from_rank0, check_replicas, parameter_digest, tensors_digest
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
    workers: int
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


MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class DueWork:
    """Periodic work that has fallen due and waits for the replicas to agree."""

    digest: bool = False
    eval: bool = False
    checkpoint: bool = False


class Trainer:
    """Trains the config's task (the small GPT, or a federated classifier) on this worker's shard;
    all workers run it in lockstep.

    With a ``membership`` the trainer is elastic: it forms its process group through the
    coordinator, and a failed collective rolls the step back, regroups and redoes it.
    """

    def __init__(
        self,
        config: TrainConfig,
        group: dist.ProcessGroup | None = None,
        progress: bool = True,
        membership: ElasticMembership | None = None,
    ):
        config.validate()
        self.config = config
        self.group = group
        self.membership = membership
        self.method = config.resolved_method()
        if membership is not None and not self.method.traits.elastic:
            raise ValueError(
                f"method {self.method.name!r} cannot change membership (torch DDP and zeroth-order steps keep "
                "their group): pick a disttrain per-step or local-step method for elastic training (see `disttrain methods`)"
            )
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.task = build_task(config)
        self.model = self.task.model.to(self.device)
        self.step = 0
        self.start_step = 0  # where this process started or resumed
        self.steps_run = 0
        self.total_bytes = 0
        self.total_wire_bytes = 0
        self._due = DueWork()
        if membership is not None:
            membership.enter()
        else:
            check_same_config(config, group)
            broadcast_from_rank0(self.model, group=group)
        self._refresh_rank()
        self.progress = progress and self.rank == 0
        self.engine = build_engine(self.model, self.method, config, group, elastic=membership is not None)
        if config.checkpoint_dir and checkpoint.shared_path(config.checkpoint_dir).is_file():
            self._resume()
        if membership is not None:
            try:
                self._synchronise()
            except RuntimeError as error:
                log.warning("state transfer failed (%s); regrouping", error)
                membership.report_failure(self.step)
                self._regroup()

    def _refresh_rank(self) -> None:
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def _wait(self, work: dist.Work) -> None:
        wait_work(work)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean validation loss over the fixed validation batches, top-1 accuracy), split across workers."""
        self.model.eval()
        batches = self.task.val_batches()
        totals = torch.zeros(4, dtype=torch.float64, device=collective_device(self.group))
        for index in range(self.rank, len(batches), self.world_size):
            logits, labels, loss = forward_outputs(self.model, self._on_device(batches[index]), self.config.precision)
            correct = (logits.argmax(dim=-1) == labels).sum().item()
            totals += torch.tensor([loss.item(), 1.0, correct, labels.numel()], dtype=torch.float64, device=totals.device)
        self._wait(dist.all_reduce(totals, group=self.group, async_op=True))
        self.model.train()
        return (totals[0] / totals[1]).item(), (totals[2] / totals[3]).item()

    def _on_device(self, batch: Batch) -> Batch:
        return batch_to(batch, self.device)

    # --- replica state: what a joiner receives from a donor -----------------------------
    def export_replica(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.engine.optimizer.state_dict(),
            "engine": self.engine.shared_state_dict(),
            "refresh_epoch": self.membership.agent.refresh_epoch if self.membership else 0,
        }

    def load_replica(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.engine.optimizer.load_state_dict(state["optimizer"])
        self.engine.load_state_dict(state["engine"])
        self.step = state["step"]
        if self.membership is not None:
            self.membership.agent.refresh_epoch = state["refresh_epoch"]

    def _synchronise(self) -> None:
        assert self.membership is not None
        plan = synchronise(
            self.step,
            self.membership.fresh,
            tensors_digest(self.engine.replica_parameters()),
            self.export_replica,
            self.load_replica,
        )
        self.membership.fresh = False
        if plan.receivers:
            log.info("state from rank %d at step %d sent to ranks %s", plan.donor, plan.step, list(plan.receivers))

    def _regroup(self) -> None:
        """Enter the next generation and bring every member to the same state."""
        assert self.membership is not None
        while True:
            self.membership.enter()
            self._refresh_rank()
            try:
                self._synchronise()
                return
            except RuntimeError as error:
                log.warning("state transfer failed (%s); regrouping again", error)
                self.membership.report_failure(self.step)

    # --- checkpoints --------------------------------------------------------------------
    def _save(self) -> None:
        directory = self.config.checkpoint_dir
        assert directory is not None
        checkpoint.save_atomic({"engine": self.engine.state_dict()}, checkpoint.worker_path(directory, self.rank))
        self._wait(dist.barrier(group=self.group, async_op=True))
        if self.rank == 0:
            shared = {
                "step": self.step,
                "fingerprint": self.config.fingerprint(include_runtime=False),
                "model": self.model.state_dict(),
                "optimizer": self.engine.optimizer.state_dict(),
            }
            checkpoint.save_atomic(shared, checkpoint.shared_path(directory))
        self._wait(dist.barrier(group=self.group, async_op=True))

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
            self.engine.load_state_dict(checkpoint.load(worker, self.device)["engine"])
        self.step = self.start_step = shared["step"]
        log.info("resumed from %s at step %d", directory, self.step)

    # --- the loop -----------------------------------------------------------------------
    def _after_step(self, history: list[EvalPoint], last: int, started: float) -> bool:
        """Replica check, evaluation and checkpoint due after the step just committed.

        With local-step rounds the replicas agree only at round ends, so what falls due
        mid-round waits for the next one.
        """
        config, done, due = self.config, self.step, self._due
        due.digest |= done % config.digest_every == 0 or done == last
        due.eval |= done % config.eval_every == 0 or done == last
        due.checkpoint |= bool(config.checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0)
        if not self.engine.in_sync:
            return True
        identical = True
        if due.digest:
            identical = check_replicas(self.model, self.engine.optimizer, self.group, step=done)
            if identical and self.membership is not None:
                log.info("replicas identical at step %d (digest %s)", done, parameter_digest(self.model).hex()[:16])
        if due.eval:
            history.append(EvalPoint(done, *self.evaluate(), self.total_bytes, time.monotonic() - started))
            point = history[-1]
            log.info("step %d: val loss %.4f, accuracy %.4f, %d bytes sent", done, point.val_loss, point.accuracy, self.total_bytes)
        if due.checkpoint:
            self._save()
        self._due = DueWork()
        return identical

    def _membership_switch_due(self) -> bool:
        """At the engine's check points, whether the members move to a newer generation."""
        membership = self.membership
        if membership is None or not self.engine.membership_check_due(self.step, membership.config.sync_every):
            return False
        return membership.switch_due(self.step, self.engine.reducer.request_refresh)

    def _energy_due(self, step: int) -> bool:
        """Rank 0 measures the captured energy for the coordinator every sync_every steps."""
        return self.membership is not None and self.rank == 0 and step % self.membership.config.sync_every == 0

    def _report_progress(self) -> None:
        """Tell the coordinator the committed step and, now and then, the captured energy."""
        assert self.membership is not None
        agent = self.membership.agent
        agent.step = self.step
        if self.membership.awaiting_first_step:
            log.info("first step of generation %d committed (step %d)", agent.gen, self.step)
            self.membership.awaiting_first_step = False
        if self._energy_due(self.step):
            energy = self.engine.reducer.captured_energy()
            if energy is not None:
                agent.report_energy(self.step, energy)

    def _finish_together(self) -> None:
        """Wait for every member to finish before anyone leaves, so that no leave breaks a
        generation whose members still have collectives to run."""
        try:
            self._wait(dist.barrier(async_op=True))
        except RuntimeError as error:
            log.warning("members finished apart (%s); training itself is complete", error)

    def run(self, stop_at: int | None = None) -> RunSummary:
        """Train to config.steps (or stop early after step ``stop_at``) and summarise."""
        config = self.config
        stop_at = config.stop_at if stop_at is None else stop_at
        last = config.steps if stop_at is None else min(stop_at, config.steps)
        started = time.monotonic()
        history: list[EvalPoint] = []
        identical = True
        failures = 0
        bar = progress_for(self.progress, last, self.step, self.method.name)
        while self.step < last:
            try:
                if self._membership_switch_due():
                    self._regroup()
                    continue
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = learning_rate(self.step, config)
                batch = self._on_device(self.task.train_batch(self.step, self.rank, self.world_size))
                if self.membership is not None:
                    self.engine.reducer.measure_energy = self._energy_due(self.step + 1)
                loss = self.engine.step(self.step, batch)
                self.step += 1
                self.steps_run += 1
                self.total_bytes += self.engine.payload_bytes_last_step
                self.total_wire_bytes += self.engine.wire_bytes_last_step
                if self.membership is not None:
                    self._report_progress()
                identical &= self._after_step(history, last, started)
                failures = 0
            except RuntimeError as error:
                failures += 1
                if self.membership is None or failures > MAX_CONSECUTIVE_FAILURES:
                    raise
                log.warning("step %d failed (%s); regrouping", self.step, error)
                self.membership.report_failure(self.step)
                self._regroup()
                continue
            bar.update(self.step, loss=f"{loss:.3f}", kB_per_step=f"{self.engine.payload_bytes_last_step / 1e3:.1f}")
        bar.close()
        val_loss, accuracy = (history[-1].val_loss, history[-1].accuracy) if history else self.evaluate()
        if self.membership is not None:
            self._finish_together()
        return RunSummary(
            workers=self.world_size,
            steps=self.step,
            method=self.method.name,
            val_loss=val_loss,
            accuracy=accuracy,
            bytes_per_step=self.total_bytes / max(1, self.steps_run),
            dense_bytes_per_step=self.engine.dense_bytes_per_step,
            total_bytes=self.total_bytes,
            wall_s=time.monotonic() - started,
            replicas_identical=identical,
            wire_bytes_per_step=self.total_wire_bytes / max(1, self.steps_run),
            parameter_digest=parameter_digest(self.model).hex()[:16],
            history=history,
        )

"""``disttrain.Session``: a training job's compressed exchange in your own loop, for any model and optimizer.

    session = disttrain.Session(model, optimizer)   # the default method: diloco-sparse-k4-h5
    for x, y in batches:
        session.backward(loss_fn(model(x), y))
        session.step()                              # instead of optimizer.step()
        session.zero_grad()
    session.finish()                                # exchanges a last partial round; replicas agree

or, with the forward pass as a closure (needed by zeroth-order methods; it lets an elastic job
redo a failed step in the next generation from a fresh forward pass):

    loss = session.step(lambda: loss_fn(model(x), y))

With a per-step method (``power-int4-r16`` ...) every step's gradients are averaged by compressed
collectives that launch during backward. With a local-step method (``diloco-*``, the default) your
optimizer's steps are local and every H steps one compressed exchange of the round's update and an
outer step make every replica the same. Either way the session counts bytes, checks that replicas
are bit-identical, and saves and restores everything a resumed run needs. ``disttrain train``'s
own trainer is a loop like yours around a Session.

Elastic, with no torchrun: give ``coordinator="tcp://HOST:PORT"`` (or set $DISTTRAIN_COORDINATOR)
and a job secret ($DISTTRAIN_SECRET or ``secret_file``), and the session forms its process group
through a running ``disttrain coordinator``. Workers may die or join mid-run; a failed exchange is
redone in the next generation inside ``step()``, and a joiner receives a donor's state (model,
optimizer, scheduler, exchange, registered state and the step) when it is created. Its loop seeks
its data from ``session.steps``:

    while session.steps < total:
        x, y = batch(session.steps)
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import DEFAULT_BUCKET_CAP_BYTES
from disttrain.comm.layout import INNER_MODES, Inner, Layout, check_elastic_inner, layout_for, tensors_bytes
from disttrain.comm.waiting import wait_work
from disttrain.compress.factory import CompressionSpec
from disttrain.exchange import Exchange, ExchangeOptions, build_exchange
from disttrain.exchange.base import Closure
from disttrain.exchange.membership import Membership, membership_for, model_fingerprint
from disttrain.federated.zeroth_order import ZOConfig
from disttrain.methods import DEFAULT_METHOD, PROJECTED_OPTIMIZERS, Method, get_method
from disttrain.optim.projected_adamw import ProjectedAdamW
from disttrain.train import checkpoint
from disttrain.train.replica import check_replicas, tensors_digest

log = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointMismatch(ValueError):
    """A saved state was written by a session with another method, settings, seed or model shape."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StepReport:
    """What one step did, for a progress or metrics callback."""

    step: int  # steps done so far
    exchanged: bool  # whether this step ran a compressed exchange
    payload_bytes: int  # what this worker put into collectives in this step
    wire_bytes: int  # what those collectives moved per worker
    in_sync: bool  # whether every replica now holds the same weights


def resolve_method(method: str | Method | CompressionSpec, local_steps: int | None, overrides: dict[str, Any]) -> Method:
    """The method of a name, a Method or a CompressionSpec (a per-step method), with CompressionSpec ``overrides``."""
    if isinstance(method, CompressionSpec):
        chosen = Method("custom", "a CompressionSpec given to Session", method)
    elif isinstance(method, Method):
        chosen = method
    else:
        chosen = get_method(method)
    fields = [f.name for f in dataclasses.fields(CompressionSpec)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unknown compression option(s) {unknown}; CompressionSpec fields are: {', '.join(fields)}")
    if local_steps is not None:
        if not chosen.traits.rounds:
            raise ValueError(f"local_steps applies to local-step methods, and {chosen.name!r} exchanges every step")
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        chosen = dataclasses.replace(chosen, local_steps=local_steps)
    chosen = dataclasses.replace(chosen, compression=dataclasses.replace(chosen.compression, **overrides))
    chosen.compression.validate()
    return chosen


def _check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method) -> None:
    """Something must be trainable, every trainable parameter the optimizer updates must be
    exchanged, and a method that reads averaged coefficients needs an optimizer that can."""
    exchanged = {id(p) for p in model.parameters() if p.requires_grad}
    if not exchanged:
        raise ValueError("no parameter of the model requires grad: there is nothing to train or exchange")
    updated = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    strays = [p for p in updated if id(p) not in exchanged]
    if strays:
        raise ValueError(
            f"the optimizer updates {len(strays)} trainable parameter(s) that are not the model's, "
            "so they would not be exchanged: build the optimizer from model.parameters()"
        )
    projected = method.optimizer in PROJECTED_OPTIMIZERS
    if projected != isinstance(optimizer, ProjectedAdamW):
        if projected:
            raise ValueError(
                f"method {method.name!r} keeps its optimizer's moments in the projected space: build the optimizer "
                "as disttrain.optim.ProjectedAdamW(model.parameters(), lr=...)"
            )
        raise ValueError(f"a ProjectedAdamW optimizer needs a projected method, and {method.name!r} is not one")


class Session:
    """A model and optimizer trained together by every worker of the process group.

    Collective: every rank creates it alike, and rank 0's parameters and buffers are copied to all.
    ``method`` is a registered method name (``disttrain methods`` lists them), a Method, or a
    CompressionSpec for a per-step exchange; keyword arguments such as ``rank=4`` override
    CompressionSpec fields, and ``local_steps`` a local-step method's round length. ``seed`` keys
    the seeded bases and must be the same on every rank. ``total_steps`` ends the last round at
    that step. ``check_every`` steps (0: never) the replicas are compared at the next point where
    they agree, and repaired from rank 0 if they differ. ``resume_from`` names a checkpoint folder
    written by save(): if it holds one, the session continues from it.

    With ``coordinator`` (or $DISTTRAIN_COORDINATOR) no process group is needed: the session joins
    the elastic job ``job`` of that coordinator (secret from ``secret_file`` or $DISTTRAIN_SECRET;
    ``coordinator_key`` or $DISTTRAIN_COORDINATOR_KEY when it runs with ``--curve-keys``),
    and membership changes at round starts (every ``sync_every`` steps for per-step methods) and
    after failures, inside step(). ``membership`` takes one you built instead (the CLI's workers do).

    ``inner`` says who a worker is: ``"flat"``, every process; ``"ddp"``, a node of torchrun's
    LOCAL_WORLD_SIZE processes, which average every inner step by torch DDP (forward through
    ``session.module``) while each exchanges its share of the parameters with the other nodes
    (docs/nodes.md); ``"fsdp"``, the same with FSDP2 inside the node (shard the model with
    ``disttrain.shard_within_node`` before building the optimizer); ``"auto"``, ddp when the job
    spans several nodes of several processes each.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str | Method | CompressionSpec = DEFAULT_METHOD,
        *,
        scheduler: Any | None = None,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
        local_steps: int | None = None,
        total_steps: int | None = None,
        link_mbit: float | None = None,
        check_every: int = 0,
        on_step: Callable[[StepReport], None] | None = None,
        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
        overlap: bool = True,
        round_quorum: float = 1.0,
        round_deadline_s: float | None = None,
        zeroth_order: ZOConfig | None = None,
        coordinator: str | None = None,
        job: str = "disttrain",
        secret_file: str | None = None,
        coordinator_key: str | None = None,
        membership: Membership | None = None,
        resume_from: str | Path | None = None,
        inner: Inner = "auto",
        **compression: Any,
    ):
        self.method = resolve_method(method, local_steps, compression)
        _check_optimizer(model, optimizer, self.method)
        if inner not in INNER_MODES:
            raise ValueError(f"inner must be one of {', '.join(INNER_MODES)}, got {inner!r}")
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0 steps (0: never), got {check_every}")
        if not 0 < round_quorum <= 1:
            raise ValueError(f"round_quorum is a share of the workers in (0, 1], got {round_quorum}")
        job_fingerprint = model_fingerprint(model, dataclasses.asdict(self.method), seed)  # what an elastic job's members share
        self.members: Membership = membership or membership_for(
            group, coordinator, job, secret_file, job_fingerprint, coordinator_key, inner
        )
        if self.members.elastic:
            self.method.require_elastic()
            check_elastic_inner(inner)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.group = group
        self.check_every = check_every
        self.on_step = on_step
        self.members.enter()
        # auto makes nodes the workers only where they can be: fixed membership, a method that runs that way
        chosen = "flat" if inner == "auto" and (self.members.elastic or not self.method.makes_nodes) else inner
        self.layout: Layout = layout_for(chosen, group, elastic=self.members.elastic)
        self.members.start(self.layout.replica_tensors(model) + list(model.buffers()), self.layout.replica_group)
        self.fingerprint = model_fingerprint(model, {**dataclasses.asdict(self.method), **self.layout.fingerprint_fields()}, seed)
        options = ExchangeOptions(
            seed=seed, group=group, link_mbit=link_mbit, bucket_cap_bytes=bucket_cap_bytes, overlap=overlap,
            elastic=self.members.elastic, total_steps=total_steps, round_quorum=round_quorum,
            round_deadline_s=round_deadline_s, zeroth_order=zeroth_order or ZOConfig(), layout=self.layout,
        )
        self.exchange: Exchange = build_exchange(model, optimizer, self.method, options)
        self.steps = 0  # steps done; a joiner starts at the donor's (loop with `while session.steps < total`)
        self.total_bytes = 0
        self.total_wire_bytes = 0
        self.steps_counted = 0  # steps whose bytes total_bytes holds (a joiner's start at the donor's step is not one)
        self.replicas_identical = True  # every replica check so far found identical parameters
        self._check_due = False
        self._extra: dict[str, Stateful] = {}
        self._received_extra: dict[str, Any] = {}  # a donor's or a checkpoint's registered state, loaded on registration
        if resume_from is not None and checkpoint.shared_path(resume_from).is_file():
            self.load(resume_from)
        self.members.agree(self)
        self.members.settle(self)  # what every member does between steps; a joiner starts here
        log.info(
            "session: method %s, %d parameters exchanged, dense fp32 would send %d bytes per step; %s",
            self.method.name, sum(p.numel() for p in model.parameters() if p.requires_grad), self.dense_bytes_per_step,
            self.layout.describe(),
        )

    # --- the loop ---------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """What forward passes go through: the model itself, or its torch DDP wrapper for the DDP methods."""
        return self.exchange.module

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` (per-step methods launch their collectives from its hooks)."""
        if self.exchange.needs_closure:
            raise RuntimeError(f"method {self.method.name!r} runs no backward: give session.step() the forward pass as a closure")
        loss.backward(**kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Backward passes inside accumulate gradients locally; the next one outside sends the sum."""
        return self.exchange.no_sync()

    def synchronize(self) -> None:
        """Make ``.grad`` what the step will apply: the average for a per-step method (call it to clip
        or inspect averaged gradients before step()); a local-step method's gradients are local."""
        self.exchange.synchronize()

    def step(self, closure: Closure | None = None) -> float | None:
        """Instead of ``optimizer.step()``: update, exchange when due, then the scheduler's step.

        With ``closure`` (a forward pass returning the loss) the session zeroes the gradients, runs
        it and backward itself, skips it where a closed round would drop its work, and returns the
        loss as a float."""
        step = self.steps
        losses: list[float] = []

        def attempt() -> bool:
            if closure is not None and not self.exchange.needs_closure and self.exchange.local_work_counts(step):
                self.zero_grad()
                loss = closure()
                self.backward(loss)
                losses.append(loss.item())
            return self.exchange.step(step, closure)

        exchanged = self.members.run(attempt, self)
        if self.steps != step:
            return None  # a regroup brought a donor's state from after this step
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        self.steps_counted += 1
        self._after(bool(exchanged))
        self.members.step_committed(self)
        self.members.settle(self)
        if self.exchange.needs_closure:
            return self.exchange.last_loss
        return losses[-1] if losses else None

    def zero_grad(self) -> None:
        """Set every gradient of the model to None."""
        self.model.zero_grad(set_to_none=True)

    def collective(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` (collectives of your own, e.g. an evaluation's all_reduce) so that under a
        coordinator a failure regroups and runs it again; None if the regroup brought a later state."""
        return self.members.run(work, self)

    def finish(self) -> None:
        """At the end of training: exchange a round still open, so every replica ends the same (reported
        to ``on_step`` only when it exchanged), check the replicas if checks are on, and leave."""
        self._check_due |= self.check_every > 0
        self._after(bool(self.members.run(self.exchange.finish, self)), report=False)
        self.members.run(self.check_if_due, self)
        self.members.finish(self)

    def _after(self, exchanged: bool, report: bool = True) -> None:
        """Count the step's bytes, note a replica check that fell due, report."""
        payload = self.exchange.payload_bytes_last_step if exchanged else 0
        wire = self.exchange.wire_bytes_last_step if exchanged else 0
        self.total_bytes += payload
        self.total_wire_bytes += wire
        self._check_due |= bool(self.check_every) and self.steps % self.check_every == 0
        if self.on_step is not None and (report or exchanged):
            self.on_step(StepReport(self.steps, exchanged, payload, wire, self.in_sync))

    # --- what it sent -----------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        """Whether every replica holds the same weights now (always for per-step methods; at round ends for rounds)."""
        return self.exchange.in_sync

    @property
    def bytes_last_step(self) -> int:
        """Payload bytes this worker put into collectives in the last step."""
        return self.exchange.payload_bytes_last_step

    @property
    def dense_bytes_per_step(self) -> int:
        """What a dense fp32 all-reduce of the exchanged parameters would move per step."""
        return self.exchange.dense_bytes_per_step

    @property
    def bytes_per_step(self) -> float:
        return self.total_bytes / max(1, self.steps_counted)

    @property
    def wire_bytes_per_step(self) -> float:
        return self.total_wire_bytes / max(1, self.steps_counted)

    def summary(self) -> dict[str, Any]:
        """The run so far in one dict: steps, bytes (payload and wire), compression, replica checks."""
        return {
            "steps": self.steps,
            "workers": self.layout.workers,
            "processes_per_worker": self.layout.processes_per_worker,
            "method": self.method.name,
            "bytes_per_step": round(self.bytes_per_step, 1),
            "wire_bytes_per_step": round(self.wire_bytes_per_step, 1),
            "dense_bytes_per_step": self.dense_bytes_per_step,
            "compression_ratio": round(self.dense_bytes_per_step / max(self.bytes_per_step, 1e-9), 1),
            "total_bytes": self.total_bytes,
            "replicas_identical": self.replicas_identical,
            "parameter_digest": self.parameters_digest()[:16],
        }

    def held_bytes(self) -> dict[str, int]:
        """Bytes this process holds between steps (under FSDP2, of its shards), where replicas agree:
        the parameters, the optimizer's state, the exchange's (round start, outer momentum, votes, residuals)."""
        return {
            "parameters": tensors_bytes(self.model.parameters()),
            "optimizer": tensors_bytes(self.optimizer.state.values()),
            "exchange": tensors_bytes([self.exchange.state_dict()]),
        }

    # --- replicas ---------------------------------------------------------------------
    def check_if_due(self) -> None:
        """The replica check that fell due (every ``check_every`` steps), once the replicas agree."""
        if self._check_due and self.in_sync:
            self.check_replicas()
            self._check_due = False

    def parameters_digest(self) -> str:
        """SHA-256 (hex) of this replica's parameters (under FSDP2: of this process's shards), bit for bit."""
        return tensors_digest(self.layout.replica_tensors(self.model)).hex()

    def check_replicas(self) -> bool:
        """Collective, where replicas agree (``in_sync``): True when every rank holds bit-identical
        parameters; otherwise logs the differing ranks and copies rank 0's weights to all."""
        if not self.in_sync:
            raise RuntimeError("replicas agree only at round ends: check them when session.in_sync (or after finish())")
        identical = check_replicas(
            self.model, self.layout.replica_group, self.steps, self.exchange.take_rank0_replica, self.layout.replica_tensors(self.model)
        )
        if identical and self.members.elastic:
            log.info("replicas identical at step %d (digest %s)", self.steps, self.parameters_digest()[:16])
        self.replicas_identical &= identical
        return identical

    # --- state ------------------------------------------------------------------------
    def register_state(self, name: str, state: Stateful) -> None:
        """Save and restore ``state`` (anything with state_dict/load_state_dict, e.g. a data loader's
        position) with the session; what a donor or a checkpoint holds for it is loaded now."""
        if name in self._extra:
            raise ValueError(f"state {name!r} is registered already")
        self._extra[name] = state
        if name in self._received_extra:
            state.load_state_dict(self._received_extra.pop(name))

    def _state(self, exchange: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "exchange": exchange,
            "extra": {name: state.state_dict() for name, state in self._extra.items()},
            "check_due": self._check_due,
        }

    def _load(self, state: dict[str, Any]) -> None:
        """Model, optimizer, scheduler, step and registered state of ``state`` (the exchange's state is loaded after)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
        self._check_due = state["check_due"]
        for name, extra in state["extra"].items():
            if name in self._extra:
                self._extra[name].load_state_dict(extra)
            else:
                self._received_extra[name] = extra

    def state_dict(self) -> dict[str, Any]:
        """Everything this worker needs to resume: model, optimizer, scheduler, exchange, registered state."""
        return {
            **self._state(self.exchange.state_dict()),
            "fingerprint": self.fingerprint,
            "bytes": (self.total_bytes, self.total_wire_bytes, self.steps_counted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned; the next step() continues from its step."""
        self._check_fingerprint(state)
        self._load(state)
        self.exchange.load_state_dict(state["exchange"])
        self.total_bytes, self.total_wire_bytes, self.steps_counted = state["bytes"]

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointMismatch(
                "the state was saved with another method, settings, seed or model shape: resume with the same ones"
            )

    # --- checkpoints ------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Collective, where replicas agree: write the run into ``directory`` atomically, each worker
        its own state and rank 0 what every replica shares, last, as the checkpoint's commit mark."""
        self.collective(lambda: self._write_checkpoint(directory))

    def _write_checkpoint(self, directory: str | Path) -> None:
        """One unit of collective work: redone from its start, ranks read again, after a regroup."""
        rank = dist.get_rank(self.group)
        checkpoint.save_atomic(self.state_dict(), checkpoint.worker_path(directory, rank))
        wait_work(dist.barrier(group=self.group, async_op=True))
        if rank == 0:
            shared = {**self.export_replica(), "fingerprint": self.fingerprint}
            checkpoint.save_atomic(shared, checkpoint.shared_path(directory))
        wait_work(dist.barrier(group=self.group, async_op=True))

    def load(self, directory: str | Path) -> None:
        """Continue from the checkpoint in ``directory``: this worker's own state where it saved one
        at the checkpoint's step, otherwise (a worker new to the job) the shared state, fresh residuals."""
        device = next(self.model.parameters()).device
        shared = checkpoint.load(checkpoint.shared_path(directory), device)
        self._check_fingerprint(shared)
        own = checkpoint.worker_path(directory, dist.get_rank(self.group))
        state = checkpoint.load(own, device) if own.is_file() else None
        if state is not None and state["steps"] == shared["steps"]:
            self.load_state_dict(state)
        else:
            if state is not None:
                log.warning("%s is from step %d, the checkpoint from %d: taking the shared state", own, state["steps"], shared["steps"])
            self.load_replica(shared)
        log.info("resumed from %s at step %d", directory, self.steps)

    # --- elastic membership: what a joiner receives from a donor ------------------------
    def replica_digest(self) -> bytes:
        """SHA-256 of what every replica holds alike whenever membership may change."""
        return tensors_digest(self.exchange.replica_parameters())

    def export_replica(self) -> dict[str, Any]:
        """This replica's state for a joiner: like state_dict(), with the exchange's shared state only."""
        return self._state(self.exchange.shared_state_dict())

    def load_replica(self, state: dict[str, Any]) -> None:
        """Become the donor's replica; registered state not registered yet is loaded when it is."""
        self._load(state)
        self.exchange.load_shared_state_dict(state["exchange"])


def wrap(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: str | CompressionSpec = DEFAULT_METHOD, **options: Any
) -> Session:
    """``Session(model, optimizer, method, **options)``: the whole runtime for your model in your loop."""
    return Session(model, optimizer, method, **options)

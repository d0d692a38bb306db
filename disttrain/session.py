"""``disttrain.Session``: a training job's compressed exchange in your own loop, for any model and optimizer.

    session = disttrain.Session(model, optimizer)   # the default method: diloco-sparse-k4-h5
    for x, y in batches:
        session.backward(loss_fn(model(x), y))
        session.step()                              # instead of optimizer.step()
        session.zero_grad()
    session.finish()                                # exchanges a last partial round; replicas agree

With a per-step method (``power-int4-r16`` ...) every step's gradients are averaged by compressed
collectives that launch during backward. With a local-step method (``diloco-*``, the default) your
optimizer's steps are local and every H steps one compressed exchange of the round's update and an
outer step make every replica the same. Either way the session counts bytes, checks that replicas
are bit-identical, and saves and restores everything a resumed run needs.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import DEFAULT_BUCKET_CAP_BYTES
from disttrain.comm.link import LinkEmulator
from disttrain.compress.factory import CompressionSpec
from disttrain.exchange import Exchange, LocalRoundsExchange, PerStepExchange
from disttrain.exchange.membership import Membership, membership_for, model_fingerprint
from disttrain.methods import DEFAULT_METHOD, METHODS, Method, get_method
from disttrain.train import checkpoint
from disttrain.train.replica import check_replicas, parameter_digest, tensors_digest

log = logging.getLogger(__name__)



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


def unsupported(method: Method) -> str | None:
    """Why a Session cannot run ``method`` in a user's loop (None when it can)."""
    if method.traits.torch_ddp:
        return (
            f"runs inside torch DDP (engine {method.engine!r}); with DDP, register "
            "disttrain.comm.disttrain_hook on your DistributedDataParallel model instead"
        )
    if not method.traits.user_optimizer:
        return f"needs the {method.engine!r} engine of `disttrain train`, which runs its own forward passes"
    if method.optimizer != "adamw":
        return (
            f"replaces your optimizer with {method.optimizer}; use it through `disttrain train` "
            "or CompressedAllReduce with disttrain.optim directly"
        )
    return None


def supported_methods() -> list[str]:
    """The registered methods a Session runs with your own optimizer."""
    return sorted(name for name, method in METHODS.items() if unsupported(method) is None)


def resolve_method(method: str | CompressionSpec, local_steps: int | None, overrides: dict[str, Any]) -> Method:
    """The method of a name or a CompressionSpec (a per-step method), with CompressionSpec ``overrides``."""
    if isinstance(method, CompressionSpec):
        chosen = Method("custom", "a CompressionSpec given to Session", method)
    else:
        chosen = get_method(method)
        reason = unsupported(chosen)
        if reason is not None:
            raise ValueError(
                f"Session cannot run method {method!r}: it {reason}. Sessions run: {', '.join(supported_methods())}"
            )
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


def _check_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Something must be trainable, and every trainable parameter the optimizer updates must be
    exchanged, or replicas drift apart."""
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


class Session:
    """A model and optimizer trained together by every worker of the process group.

    Collective: every rank creates it alike, and rank 0's parameters and buffers are copied to all.
    ``method`` is a registered method name (``supported_methods()``) or a CompressionSpec for a
    per-step exchange; keyword arguments such as ``rank=4`` override CompressionSpec fields, and
    ``local_steps`` a local-step method's round length. ``seed`` keys the seeded bases and must be
    the same on every rank. ``check_every`` steps (0: never) the replicas are compared at the next
    point where they agree, and repaired from rank 0 if they differ.

    With ``coordinator`` (or $DISTTRAIN_COORDINATOR) no process group is needed: the session joins
    the elastic job ``job`` of that coordinator (secret from ``secret_file`` or $DISTTRAIN_SECRET),
    and membership changes at round starts and after failures, inside step(). Local-step methods only.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str | CompressionSpec = DEFAULT_METHOD,
        *,
        scheduler: Any | None = None,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
        local_steps: int | None = None,
        link_mbit: float | None = None,
        check_every: int = 0,
        on_step: Callable[[StepReport], None] | None = None,
        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
        coordinator: str | None = None,
        job: str = "disttrain",
        secret_file: str | None = None,
        **compression: Any,
    ):
        self.method = resolve_method(method, local_steps, compression)
        _check_parameters(model, optimizer)
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0 steps (0: never), got {check_every}")
        fingerprint = model_fingerprint(model, dataclasses.asdict(self.method), seed)
        self.members: Membership = membership_for(group, coordinator, job, secret_file, fingerprint)
        if self.members.elastic and not self.method.traits.rounds:
            raise ValueError(
                f"a Session under a coordinator runs local-step methods (diloco-*); {self.method.name!r} "
                "exchanges every step: pick one of "
                + ", ".join(m for m in supported_methods() if METHODS[m].traits.rounds)
            )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.group = group
        self.check_every = check_every
        self.on_step = on_step
        self.members.join(model)
        link = LinkEmulator(link_mbit) if link_mbit else None
        self.exchange: Exchange
        if self.method.traits.rounds:
            self.exchange = LocalRoundsExchange(model, optimizer, self.method, seed, group, link, self.members.elastic)
        else:
            self.exchange = PerStepExchange(model, optimizer, self.method, seed, group, bucket_cap_bytes, link)
        self.steps = 0  # steps done; a joiner starts at the donor's (loop with `while session.steps < total`)
        self.total_bytes = 0
        self.total_wire_bytes = 0
        self.replicas_identical = True  # every replica check so far found identical parameters
        self._check_due = False
        self._extra: dict[str, Stateful] = {}
        self._received_extra: dict[str, Any] = {}  # a donor's registered state, loaded on registration
        self.members.agree(self)
        log.info(
            "session: method %s, %d parameters exchanged, dense fp32 would send %d bytes per step",
            self.method.name, sum(p.numel() for p in model.parameters() if p.requires_grad), self.dense_bytes_per_step,
        )

    # --- the loop ---------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` (per-step methods launch their collectives from its hooks)."""
        loss.backward(**kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Backward passes inside accumulate gradients locally; the next one outside sends the sum."""
        return self.exchange.no_sync()

    def synchronize(self) -> None:
        """Make ``.grad`` what the step will apply: the average for a per-step method (call it to clip
        or inspect averaged gradients before step()); a local-step method's gradients are local."""
        self.exchange.synchronize()

    def step(self) -> None:
        """Instead of ``optimizer.step()``: update, exchange when due, then the scheduler's step."""
        step = self.steps
        exchanged = self.members.exchange(lambda: self.exchange.step(step), self)
        if self.steps != step:
            return  # a regroup brought a donor's state from after this step
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if self.exchange.in_sync:
            self.members.round_start(self)
        self._after(exchanged)

    def zero_grad(self) -> None:
        """Set every gradient of the model to None."""
        self.model.zero_grad(set_to_none=True)

    def finish(self) -> None:
        """At the end of training: exchange a round still open, so every replica ends the same (reported
        to ``on_step`` only when it exchanged), check the replicas if checks are on, and leave."""
        self._check_due |= self.check_every > 0
        self._after(self.members.exchange(self.exchange.finish, self), report=False)
        self.members.finish(self)

    def _after(self, exchanged: bool, report: bool = True) -> None:
        """Count the step's bytes, check the replicas when due and where they agree, report."""
        payload = self.exchange.payload_bytes_last_step if exchanged else 0
        wire = self.exchange.wire_bytes_last_step if exchanged else 0
        self.total_bytes += payload
        self.total_wire_bytes += wire
        self._check_due |= bool(self.check_every) and self.steps % self.check_every == 0
        if self._check_due and self.in_sync:
            self.check_replicas()
            self._check_due = False
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
        return self.total_bytes / max(1, self.steps)

    def summary(self) -> dict[str, Any]:
        """The run so far in one dict: steps, bytes (payload and wire), compression, replica checks."""
        return {
            "steps": self.steps,
            "workers": dist.get_world_size(self.group),
            "method": self.method.name,
            "bytes_per_step": round(self.bytes_per_step, 1),
            "wire_bytes_per_step": round(self.total_wire_bytes / max(1, self.steps), 1),
            "dense_bytes_per_step": self.dense_bytes_per_step,
            "compression_ratio": round(self.dense_bytes_per_step / max(self.bytes_per_step, 1e-9), 1),
            "total_bytes": self.total_bytes,
            "replicas_identical": self.replicas_identical,
            "parameter_digest": self.parameters_digest()[:16],
        }

    # --- replicas ---------------------------------------------------------------------
    def parameters_digest(self) -> str:
        """SHA-256 (hex) of this replica's parameters, bit for bit."""
        return parameter_digest(self.model).hex()

    def check_replicas(self) -> bool:
        """Collective, where replicas agree (``in_sync``): True when every rank holds bit-identical
        parameters; otherwise logs the differing ranks and copies rank 0's weights to all."""
        if not self.in_sync:
            raise RuntimeError("replicas agree only at round ends: check them when session.in_sync (or after finish())")
        identical = check_replicas(self.model, self.exchange.shared_optimizer, self.group, self.steps)
        if not identical:
            self.exchange.adopt_repaired_weights()
        self.replicas_identical &= identical
        return identical

    # --- state ------------------------------------------------------------------------
    def register_state(self, name: str, state: Stateful) -> None:
        """Save and restore ``state`` (anything with state_dict/load_state_dict, e.g. a data loader's position) with the session."""
        if name in self._extra:
            raise ValueError(f"state {name!r} is registered already")
        self._extra[name] = state
        if name in self._received_extra:  # a joiner registers what its donor sent
            state.load_state_dict(self._received_extra.pop(name))

    def _state(self, exchange: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "exchange": exchange,
            "extra": {name: state.state_dict() for name, state in self._extra.items()},
        }

    def _load(self, state: dict[str, Any]) -> None:
        """Model, optimizer, scheduler and step of ``state`` (the exchange's state is loaded after)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]

    def state_dict(self) -> dict[str, Any]:
        """Everything this worker needs to resume: model, optimizer, scheduler, exchange, registered state."""
        return {
            **self._state(self.exchange.state_dict()),
            "method": dataclasses.asdict(self.method),
            "bytes": (self.total_bytes, self.total_wire_bytes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned; the next step() continues from its step."""
        mine = dataclasses.asdict(self.method)
        if state["method"] != mine:
            differing = sorted(k for k in mine if state["method"].get(k) != mine[k])
            raise ValueError(f"the state was saved with another method or settings ({', '.join(differing)}): resume with the same")
        missing = sorted(set(self._extra) ^ set(state["extra"]))
        if missing:
            raise ValueError(f"registered state differs from the saved one: {missing}")
        self._load(state)
        self.exchange.load_state_dict(state["exchange"])
        self.total_bytes, self.total_wire_bytes = state["bytes"]
        for name, extra in self._extra.items():
            extra.load_state_dict(state["extra"][name])

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
        for name, extra in state["extra"].items():
            if name in self._extra:
                self._extra[name].load_state_dict(extra)
            else:
                self._received_extra[name] = extra

    def request_refresh(self) -> None:
        """Renew the exchange's bases at this step (the coordinator asked every member to)."""
        self.exchange.reducer.request_refresh()

    def save(self, path: str | Path) -> Path:
        """Write this worker's state atomically; ``{rank}`` in ``path`` becomes this worker's rank."""
        target = Path(str(path).format(rank=dist.get_rank(self.group)))
        checkpoint.save_atomic(self.state_dict(), target)
        return target

    def load(self, path: str | Path) -> None:
        """Restore this worker's state written by save() (``{rank}`` as there)."""
        source = Path(str(path).format(rank=dist.get_rank(self.group)))
        self.load_state_dict(checkpoint.load(source, next(self.model.parameters()).device))


def wrap(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: str | CompressionSpec = DEFAULT_METHOD, **options: Any
) -> Session:
    """``Session(model, optimizer, method, **options)``: the whole runtime for your model in your loop."""
    return Session(model, optimizer, method, **options)

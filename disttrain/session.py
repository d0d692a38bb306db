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
from disttrain.methods import DEFAULT_METHOD, METHODS, Method, get_method
from disttrain.train import checkpoint
from disttrain.train.replica import broadcast_from_rank0, check_replicas, parameter_digest

log = logging.getLogger(__name__)

SESSION_ENGINES = ("disttrain", "local_steps")  # engines a Session runs in the user's loop


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
    if method.engine.startswith("ddp"):
        return (
            f"runs inside torch DDP (engine {method.engine!r}); with DDP, register "
            "disttrain.comm.disttrain_hook on your DistributedDataParallel model instead"
        )
    if method.engine not in SESSION_ENGINES:
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
        if chosen.engine != "local_steps":
            raise ValueError(f"local_steps applies to local-step methods, and {chosen.name!r} exchanges every step")
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        chosen = dataclasses.replace(chosen, local_steps=local_steps)
    chosen = dataclasses.replace(chosen, compression=dataclasses.replace(chosen.compression, **overrides))
    chosen.compression.validate()
    return chosen


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a disttrain Session needs an initialised torch.distributed process group: launch your script "
            "with torchrun (torchrun --nproc-per-node 2 train.py) and call "
            "torch.distributed.init_process_group('gloo') (or 'nccl') before creating it"
        )


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


def _broadcast_buffers(model: torch.nn.Module, group: dist.ProcessGroup | None) -> None:
    src = 0 if group is None else dist.get_global_rank(group, 0)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=src, group=group)


class Session:
    """A model and optimizer trained together by every worker of the process group.

    Collective: every rank creates it alike, and rank 0's parameters and buffers are copied to all.
    ``method`` is a registered method name (``supported_methods()``) or a CompressionSpec for a
    per-step exchange; keyword arguments such as ``rank=4`` override CompressionSpec fields, and
    ``local_steps`` a local-step method's round length. ``seed`` keys the seeded bases and must be
    the same on every rank. ``check_every`` steps (0: never) the replicas are compared at the next
    point where they agree, and repaired from rank 0 if they differ.
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
        **compression: Any,
    ):
        self.method = resolve_method(method, local_steps, compression)
        _require_process_group()
        _check_parameters(model, optimizer)
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0 steps (0: never), got {check_every}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.group = group
        self.check_every = check_every
        self.on_step = on_step
        broadcast_from_rank0(model, group=group)
        _broadcast_buffers(model, group)
        link = LinkEmulator(link_mbit) if link_mbit else None
        self.exchange: Exchange
        if self.method.engine == "local_steps":
            self.exchange = LocalRoundsExchange(model, optimizer, self.method, seed, group, link)
        else:
            self.exchange = PerStepExchange(model, optimizer, self.method, seed, group, bucket_cap_bytes, link)
        self.steps = 0
        self.total_bytes = 0
        self.total_wire_bytes = 0
        self.replicas_identical = True  # every replica check so far found identical parameters
        self._check_due = False
        self._extra: dict[str, Stateful] = {}
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
        exchanged = self.exchange.step(self.steps)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        self._after(exchanged)

    def zero_grad(self) -> None:
        """Set every gradient of the model to None."""
        self.model.zero_grad(set_to_none=True)

    def finish(self) -> None:
        """At the end of training: exchange a round still open, so every replica ends the same."""
        self._check_due |= self.check_every > 0
        self._after(self.exchange.finish())

    def _after(self, exchanged: bool) -> None:
        """Count the step's bytes, check the replicas when due and where they agree, report."""
        payload = self.exchange.payload_bytes_last_step if exchanged else 0
        wire = self.exchange.wire_bytes_last_step if exchanged else 0
        self.total_bytes += payload
        self.total_wire_bytes += wire
        self._check_due |= bool(self.check_every) and self.steps % self.check_every == 0
        if self._check_due and self.in_sync:
            self.check_replicas()
            self._check_due = False
        if self.on_step is not None:
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
        shared_optimizer = self.optimizer if self.method.engine != "local_steps" else None  # inner state is local
        identical = check_replicas(self.model, shared_optimizer, self.group, self.steps)
        self.replicas_identical &= identical
        return identical

    # --- state ------------------------------------------------------------------------
    def register_state(self, name: str, state: Stateful) -> None:
        """Save and restore ``state`` (anything with state_dict/load_state_dict, e.g. a data loader's position) with the session."""
        if name in self._extra:
            raise ValueError(f"state {name!r} is registered already")
        self._extra[name] = state

    def state_dict(self) -> dict[str, Any]:
        """Everything this worker needs to resume: model, optimizer, scheduler, exchange, registered state."""
        return {
            "steps": self.steps,
            "method": dataclasses.asdict(self.method),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "exchange": self.exchange.state_dict(),
            "bytes": (self.total_bytes, self.total_wire_bytes),
            "extra": {name: state.state_dict() for name, state in self._extra.items()},
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.exchange.load_state_dict(state["exchange"])
        self.steps = state["steps"]
        self.total_bytes, self.total_wire_bytes = state["bytes"]
        for name, extra in self._extra.items():
            extra.load_state_dict(state["extra"][name])

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

"""``disttrain.wrap``: compressed gradient averaging for any torch model and optimizer, in your loop.

    dt = disttrain.wrap(model, optimizer, method="power-int4-r16")
    for x, y in batches:
        dt.backward(loss_fn(model(x), y))  # or loss.backward(): collectives launch during backward
        dt.step()                          # averaged gradients -> optimizer.step() -> commit
        dt.zero_grad()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import DEFAULT_BUCKET_CAP_BYTES, CollectiveFailed, CompressedAllReduce
from disttrain.compress.factory import CompressionSpec
from disttrain.methods import DEFAULT_PER_STEP_METHOD, METHODS, Method, get_method
from disttrain.train.replica import broadcast_from_rank0, check_replicas, parameter_digest

log = logging.getLogger(__name__)


def _unsupported(method: Method) -> str | None:
    """Why wrap cannot run ``method`` (None when it can)."""
    if method.engine.startswith("ddp"):
        return (
            f"runs inside torch DDP (engine {method.engine!r}); with DDP, register "
            "disttrain.comm.disttrain_hook on your DistributedDataParallel model instead"
        )
    if method.engine != "disttrain":
        return (
            f"needs the {method.engine!r} engine of `disttrain train` (its own schedule of steps "
            "and exchanges), while wrap exchanges gradients at every step of your loop"
        )
    if method.optimizer != "adamw":
        return (
            f"replaces your optimizer with {method.optimizer} (Adam moments in the projected space); "
            "use CompressedAllReduce with disttrain.optim.ProjectedAdamW for it"
        )
    return None


def supported_methods() -> list[str]:
    """The registered methods wrap runs: those that reconstruct gradients for your own optimizer."""
    return sorted(name for name, method in METHODS.items() if _unsupported(method) is None)


def resolve_spec(method: str | CompressionSpec, overrides: dict[str, Any]) -> CompressionSpec:
    """The compression of a method name or spec, with ``overrides`` (CompressionSpec fields) applied."""
    if isinstance(method, CompressionSpec):
        spec = method
    else:
        chosen = get_method(method)
        reason = _unsupported(chosen)
        if reason is not None:
            raise ValueError(
                f"wrap cannot run method {method!r}: it {reason}. "
                f"wrap supports: {', '.join(supported_methods())}"
            )
        spec = chosen.compression
    fields = [field.name for field in dataclasses.fields(CompressionSpec)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unknown compression option(s) {unknown}; CompressionSpec fields are: {', '.join(fields)}")
    spec = dataclasses.replace(spec, **overrides)
    spec.validate()
    return spec


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "disttrain.wrap needs an initialised torch.distributed process group: launch your script "
            "with torchrun (torchrun --nproc-per-node 2 train.py) and call "
            "torch.distributed.init_process_group('gloo') (or 'nccl') before wrap()"
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
            "so their gradients would not be averaged: build the optimizer from model.parameters()"
        )


def _broadcast_buffers(model: torch.nn.Module, group: dist.ProcessGroup | None) -> None:
    src = 0 if group is None else dist.get_global_rank(group, 0)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=src, group=group)


class Wrapped:
    """A model and its optimizer whose gradients every step are averaged by compressed collectives.

    Made by ``wrap()``; one backward per ``step()`` (accumulate more inside ``no_sync()``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        spec: CompressionSpec,
        seed: int,
        group: dist.ProcessGroup | None,
        bucket_cap_bytes: int,
    ):
        _check_parameters(model, optimizer)
        self.model = model
        self.optimizer = optimizer
        self.spec = spec
        self.group = group
        broadcast_from_rank0(model, group=group)
        _broadcast_buffers(model, group)
        self.reducer = CompressedAllReduce(model.parameters(), spec, seed, group, bucket_cap_bytes)
        frozen = sum(1 for p in model.parameters() if not p.requires_grad)
        if frozen:
            log.info("wrap: %d parameters do not require grad and are not exchanged", frozen)
        log.info(
            "wrap: %d parameters exchanged in %d bucket(s), %d bytes per step instead of %d dense",
            len(self.reducer.params),
            len(self.reducer.buckets),
            self.reducer.compressed_payload_bytes(),
            self.reducer.dense_bytes_per_step,
        )
        self.steps = 0
        self.bytes_last_step = 0
        self._in_no_sync = False
        torch.autograd.graph.register_multi_grad_hook(self.reducer.params, self._count_backward)
        self._restart()

    @property
    def dense_bytes_per_step(self) -> int:
        """What a dense fp32 all-reduce of the exchanged parameters would move per step."""
        return self.reducer.dense_bytes_per_step

    def _restart(self) -> None:
        """Arm the gradient hooks for step ``self.steps``, counting its backward passes from zero."""
        self._synced_backwards = 0
        self._local_backwards = 0
        self._averaged = False
        self.reducer.start_step(self.steps)

    def _count_backward(self, _: Any) -> None:
        if self._in_no_sync:
            self._local_backwards += 1
        else:
            self._synced_backwards += 1

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``; the gradient hooks launch each bucket's collective as it fills."""
        loss.backward(**kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside (or step()) sends the sum."""
        if self._synced_backwards:
            raise RuntimeError("no_sync() after a backward that already launched this step's collectives")
        self.reducer.rollback()  # disarms the hooks; nothing of this step is pending yet
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False
            self.reducer.start_step(self.steps)

    def synchronize(self) -> None:
        """Wait for this step's collectives and write the averaged gradients into ``.grad``.

        step() calls it; call it yourself to clip or inspect the averaged gradients first."""
        if self._averaged:
            return
        if not (self._synced_backwards or self._local_backwards):
            raise RuntimeError(
                "step() called without a backward since the last step: run dt.backward(loss) "
                "(or loss.backward()) before dt.step()"
            )
        try:
            self.reducer.finish()  # on failure it rolls back and raises CollectiveFailed
        except CollectiveFailed:
            self._restart()
            raise
        if self._synced_backwards > 1:
            self.reducer.rollback()
            count = self._synced_backwards
            self._restart()
            raise RuntimeError(
                f"backward ran {count} times since the last dt.step(), but only the first one's gradients "
                "were exchanged: to accumulate gradients, run all but the last backward inside "
                "`with dt.no_sync():`, and update with dt.step(), not optimizer.step()"
            )
        self.reducer.write_gradients()
        self._averaged = True

    def step(self) -> None:
        """Average the gradients (synchronize()), run optimizer.step(), and commit error feedback."""
        self.synchronize()
        self.optimizer.step()
        self.reducer.commit()
        self.bytes_last_step = self.reducer.payload_bytes_last_step
        self.steps += 1
        self._restart()

    def zero_grad(self) -> None:
        """Set every gradient of the model to None."""
        self.model.zero_grad(set_to_none=True)

    def parameters_digest(self) -> str:
        """SHA-256 (hex) of this replica's parameters, bit for bit."""
        return parameter_digest(self.model).hex()

    def check_replicas(self) -> bool:
        """Collective: True when every rank holds bit-identical parameters; otherwise logs the
        differing ranks, copies rank 0's parameters and optimizer state to all, and returns False."""
        return check_replicas(self.model, self.optimizer, self.group, self.steps)

    def state_dict(self) -> dict[str, Any]:
        """This worker's exchange state (step, error-feedback residuals, bases), to checkpoint
        next to the model's and the optimizer's."""
        compression = dataclasses.asdict(self.spec)
        return {"step": self.steps, "compression": compression, "exchange": self.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned; the next step() continues from its step."""
        mine = dataclasses.asdict(self.spec)
        differing = sorted(k for k in mine if state["compression"].get(k) != mine[k])
        if differing:
            raise ValueError(
                f"the exchange state was saved with other compression settings ({', '.join(differing)}): "
                f"saved {state['compression']}, this wrap uses {mine}"
            )
        self.reducer.load_state_dict(state["exchange"])
        self.steps = state["step"]
        self._restart()


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str | CompressionSpec = DEFAULT_PER_STEP_METHOD,
    *,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
    **compression: Any,
) -> Wrapped:
    """Average ``model``'s gradients across the process group with a compressed exchange.

    ``method`` is a registered method name (see ``supported_methods()``) or a CompressionSpec;
    keyword arguments such as ``rank=4`` or ``payload="fp32"`` override its CompressionSpec
    fields. Collective: every rank calls it alike; rank 0's parameters and buffers are copied
    to all. ``seed`` keys the seeded bases and must be the same on every rank.
    """
    spec = resolve_spec(method, compression)
    _require_process_group()
    return Wrapped(model, optimizer, spec, seed, group, bucket_cap_bytes)

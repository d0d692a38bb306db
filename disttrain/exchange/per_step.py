"""Per-step exchange: every step's gradients averaged by compressed collectives that launch during backward.

With torch's AdamW (or any optimizer) the averaged gradient is reconstructed into ``.grad``. A
``disttrain.optim.ProjectedAdamW`` (GaLore-style methods) instead reads the averaged coefficients
straight from the exchange and keeps its moments in the projected space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from disttrain.comm.allreduce import CollectiveFailed, CompressedAllReduce
from disttrain.exchange.base import Closure, EveryStepAgrees, ExchangeOptions
from disttrain.methods import Method
from disttrain.optim.projected_adamw import ProjectedAdamW


class PerStepExchange(EveryStepAgrees):
    """One backward per step (accumulate more inside ``no_sync()``); step() averages, steps the
    optimizer and commits error feedback. A step whose collectives failed is redone from the same
    local gradients by calling step() again."""

    needs_closure = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions):
        self.model = self.module = model
        self.optimizer = optimizer
        self.group = options.group
        self.reducer = CompressedAllReduce(
            model.parameters(), method.compression, options.seed, options.group, options.bucket_cap_bytes,
            overlap=options.overlap, link=options.link(), fixed_membership=not options.elastic,
        )
        self.reads_coefficients = isinstance(optimizer, ProjectedAdamW)
        if self.reads_coefficients:
            optimizer.attach(self.reducer)
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self._step = 0
        self._in_no_sync = False
        self._redo = False  # the last attempt's collectives failed: resend the gradients already in .grad
        torch.autograd.graph.register_multi_grad_hook(self.reducer.params, self._count_backward)
        self._restart()

    def _restart(self) -> None:
        """Arm the gradient hooks for step ``self._step``, counting its backward passes from zero."""
        self._synced_backwards = 0
        self._local_backwards = 0
        self._averaged = False
        self.reducer.start_step(self._step)

    def _count_backward(self, _: Any) -> None:
        if self._in_no_sync:
            self._local_backwards += 1
        else:
            self._synced_backwards += 1

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        if self._synced_backwards:
            raise RuntimeError("no_sync() after a backward that already launched this step's collectives")
        self.reducer.rollback()  # disarms the hooks; nothing of this step is pending yet
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False
            self.reducer.start_step(self._step)

    def synchronize(self) -> None:
        """Wait for this step's collectives and write the averaged gradients into ``.grad``."""
        if self._averaged:
            return
        if not (self._synced_backwards or self._local_backwards or self._redo):
            raise RuntimeError(
                "step() called without a backward since the last step: run session.backward(loss) "
                "(or loss.backward()) before session.step()"
            )
        try:
            self.reducer.finish()  # on failure it rolls back and raises CollectiveFailed
        except CollectiveFailed:
            self._restart()
            self._redo = True
            raise
        self._redo = False
        if self._synced_backwards > 1:
            self.reducer.rollback()
            count = self._synced_backwards
            self._restart()
            raise RuntimeError(
                f"backward ran {count} times since the last step(), but only the first one's gradients "
                "were exchanged: to accumulate gradients, run all but the last backward inside "
                "`with session.no_sync():`, and update with session.step(), not optimizer.step()"
            )
        if not self.reads_coefficients:
            self.reducer.write_gradients()
        self._averaged = True

    def step(self, step: int, closure: Closure | None = None) -> bool:
        self.synchronize()
        self.optimizer.step()
        self.reducer.commit()
        self.payload_bytes_last_step = self.reducer.payload_bytes_last_step
        self.wire_bytes_last_step = self.reducer.wire_bytes_last_step
        self._step = step + 1
        self._restart()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "exchange": self.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reducer.load_state_dict(state["exchange"])
        self._step = state["step"]
        self._redo = False
        self._restart()

    def shared_state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "exchange": self.reducer.shared_state_dict()}

"""Per-step exchange: every step's gradients averaged by compressed collectives that launch during backward."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import CollectiveFailed, CompressedAllReduce
from disttrain.comm.link import LinkEmulator
from disttrain.methods import Method


class PerStepExchange:
    """One backward per step (accumulate more inside ``no_sync()``); step() averages, steps the
    optimizer and commits error feedback."""

    in_sync = True

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Method,
        seed: int,
        group: dist.ProcessGroup | None,
        bucket_cap_bytes: int,
        link: LinkEmulator | None,
    ):
        self.optimizer = optimizer
        self.reducer = CompressedAllReduce(model.parameters(), method.compression, seed, group, bucket_cap_bytes, link=link)
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self._step = 0
        self._in_no_sync = False
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
        if not (self._synced_backwards or self._local_backwards):
            raise RuntimeError(
                "step() called without a backward since the last step: run session.backward(loss) "
                "(or loss.backward()) before session.step()"
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
                f"backward ran {count} times since the last step(), but only the first one's gradients "
                "were exchanged: to accumulate gradients, run all but the last backward inside "
                "`with session.no_sync():`, and update with session.step(), not optimizer.step()"
            )
        self.reducer.write_gradients()
        self._averaged = True

    def step(self, step: int) -> bool:
        self.synchronize()
        self.optimizer.step()
        self.reducer.commit()
        self.payload_bytes_last_step = self.reducer.payload_bytes_last_step
        self.wire_bytes_last_step = self.reducer.wire_bytes_last_step
        self._step = step + 1
        self._restart()
        return True

    def finish(self) -> bool:
        return False  # every step already ended in agreement

    @property
    def shared_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer  # it applies the same averaged gradients on every replica

    def adopt_repaired_weights(self) -> None:
        pass  # the model's weights are the only copy

    def replica_parameters(self) -> list[torch.Tensor]:
        return self.reducer.params

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "exchange": self.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reducer.load_state_dict(state["exchange"])
        self._step = state["step"]
        self._restart()

    def shared_state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "exchange": self.reducer.shared_state_dict()}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

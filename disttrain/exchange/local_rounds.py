"""Local-step rounds in the user's loop: the user's optimizer steps locally; every H steps one
compressed exchange of the pseudo-gradient and the outer step make every replica the same."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.link import LinkEmulator
from disttrain.methods import Method
from disttrain.train.outer import OuterStep


def peak_lr_of(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer started with (a torch scheduler keeps it as ``initial_lr``)."""
    group = optimizer.param_groups[0]
    return group.get("initial_lr", group["lr"])


class LocalRoundsExchange:
    """Inner steps are the user's optimizer steps with no communication; every ``local_steps``-th
    step ends a round with the compressed outer step (DiLoCo)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Method,
        seed: int,
        group: dist.ProcessGroup | None,
        link: LinkEmulator | None,
    ):
        self.optimizer = optimizer
        self.local_steps = method.local_steps
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.outer = OuterStep(trainable, method, seed, peak_lr_of(optimizer), group, link)
        self.dense_bytes_per_step = self.outer.reducer.dense_bytes_per_step
        self.in_sync = True
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # inner steps never communicate

    def synchronize(self) -> None:
        pass  # the gradients of an inner step are this worker's own

    def step(self, step: int) -> bool:
        self.optimizer.step()
        self.in_sync = False
        self.payload_bytes_last_step = self.wire_bytes_last_step = 0
        if (step + 1) % self.local_steps == 0:
            return self.finish()
        return False

    def finish(self) -> bool:
        if self.in_sync:
            return False
        self.outer.apply(self.optimizer.param_groups[0]["lr"])
        self.payload_bytes_last_step = self.outer.payload_bytes_last_exchange
        self.wire_bytes_last_step = self.outer.wire_bytes_last_exchange
        self.in_sync = True
        return True

    def state_dict(self) -> dict[str, Any]:
        if not self.in_sync:
            raise RuntimeError("a checkpoint of local-step rounds is taken at a round end: call it when session.in_sync")
        return {"outer": self.outer.shared_state_dict(), "exchange": self.outer.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state["outer"])
        self.outer.reducer.load_state_dict(state["exchange"])
        self.in_sync = True

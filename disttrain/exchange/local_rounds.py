"""Local-step rounds in the user's loop: the user's optimizer steps locally; every H steps one
compressed exchange of the pseudo-gradient and the outer step make every replica the same.

Under elastic membership a round-end exchange that failed is redone by calling the same step
again: it keeps the round's local work and only exchanges. A worker that received the round's
start while that exchange was pending sends a zero pseudo-gradient, and the average is over
the workers that did the round.
"""

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
        elastic: bool = False,
    ):
        self.optimizer = optimizer
        self.local_steps = method.local_steps
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.outer = OuterStep(trainable, method, seed, peak_lr_of(optimizer), group, link, elastic)
        self.reducer = self.outer.reducer
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.in_sync = True
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.exchange_pending = False  # the round-end exchange failed and waits to be redone
        self.did_round = True  # False for a worker that received the round's start while its exchange was pending

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # inner steps never communicate

    def synchronize(self) -> None:
        pass  # the gradients of an inner step are this worker's own

    def step(self, step: int) -> bool:
        if not self.exchange_pending:  # a redone step only redoes its exchange
            self.optimizer.step()
        self.in_sync = False
        self.payload_bytes_last_step = self.wire_bytes_last_step = 0
        if (step + 1) % self.local_steps == 0:
            return self.finish()
        return False

    def finish(self) -> bool:
        if self.in_sync:
            return False
        contributors = self.outer.count_contributors(self.did_round) if self.exchange_pending else None
        self.exchange_pending = True  # from here on, a failure redoes only the exchange
        self.outer.apply(self.optimizer.param_groups[0]["lr"], contributors)
        self.exchange_pending = False
        self.did_round = True
        self.payload_bytes_last_step = self.outer.reducer.payload_bytes_last_step
        self.wire_bytes_last_step = self.outer.reducer.wire_bytes_last_step
        self.in_sync = True
        return True

    @property
    def shared_optimizer(self) -> torch.optim.Optimizer:
        return self.outer.outer  # the outer SGD; the inner optimizer's state is this worker's own

    def adopt_repaired_weights(self) -> None:
        self.outer.adopt_current_weights()

    def replica_parameters(self) -> list[torch.Tensor]:
        """What every replica holds alike, even mid-round: the round's starting weights."""
        return self.outer.global_params

    def state_dict(self) -> dict[str, Any]:
        if not self.in_sync:
            raise RuntimeError("a checkpoint of local-step rounds is taken at a round end: call it when session.in_sync")
        return {"outer": self.outer.shared_state_dict(), "exchange": self.outer.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict({**state["outer"], "reducer": state["exchange"]})  # this worker's full exchange state
        self.exchange_pending, self.did_round, self.in_sync = False, True, True  # a checkpoint is a round end

    def shared_state_dict(self) -> dict[str, Any]:
        """What a worker joining now needs, mid-round too: the round's start and whether its exchange is pending."""
        return {"outer": self.outer.shared_state_dict(), "pending": self.exchange_pending}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        """Take a donor's round start (into the model too); while its exchange is pending, send zeros in it."""
        self.outer.load_state_dict(state["outer"])
        self.exchange_pending = state["pending"]
        self.did_round = not self.exchange_pending
        self.in_sync = not self.exchange_pending

"""Local-step rounds (DiLoCo): the optimizer's steps are local; every H steps one compressed
exchange of the pseudo-gradient and the outer step (``train/outer.py``) make every replica the same.

Under elastic membership a round-end exchange that failed is redone by calling the same step
again: it keeps the round's local work and only exchanges. A worker that received the round's
start while that exchange was pending sends a zero pseudo-gradient, and the average is over
the workers that did the round.

With a round quorum or deadline (``train/rounds.py``) a round closes without waiting for
stragglers: a worker that had not finished its local steps by then drops them, sends a zero
pseudo-gradient, and starts the next round from the new global weights with everyone else.

With a ``disttrain.optim.ProjectedAdamW`` as the inner optimizer, local steps stay inside the
round's seeded subspace (``optim/local_subspace.py``): the exchange's own, which then sends them
almost exactly, or the method's ``local_subspace`` (whose round update the exchange votes on).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from disttrain.exchange.base import Closure, ExchangeOptions, peak_lr_of
from disttrain.methods import Method
from disttrain.optim.local_subspace import LocalSubspace
from disttrain.optim.projected_adamw import ProjectedAdamW
from disttrain.train.outer import OuterStep
from disttrain.train.replica import broadcast_from_rank0
from disttrain.train.rounds import RoundClosing

log = logging.getLogger(__name__)


class LocalRoundsExchange:
    """Inner steps are the optimizer's steps with no communication; every ``local_steps``-th
    step (and the run's last) ends a round with the compressed outer step."""

    needs_closure = False

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Method,
        options: ExchangeOptions,
        overlap: bool = False,
        exchanged: list[torch.nn.Parameter] | None = None,
    ):
        """``exchanged``: the parameters this worker's exchange carries (default: every trainable one)."""
        self.model = self.module = model
        self.optimizer = optimizer
        self.local_steps = method.local_steps
        self.total_steps = options.total_steps
        if exchanged is None:
            exchanged = [p for p in model.parameters() if p.requires_grad]
        self.outer = OuterStep(
            exchanged, method, options.seed, peak_lr_of(optimizer), options.group, options.link(), options.elastic, overlap
        )
        self.reducer = self.outer.reducer
        self.subspace: LocalSubspace | None = None
        if isinstance(optimizer, ProjectedAdamW):
            self.subspace = LocalSubspace(self.reducer.params, method.round_subspace, options.seed)
            optimizer.attach(self.subspace)
        self.closing = RoundClosing(options.round_quorum, options.round_deadline_s)
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.in_sync = True
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.exchange_pending = False  # the round-end exchange failed and waits to be redone
        self.did_round = True  # False for a worker that joined mid-exchange, or that a round closed without

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # inner steps never communicate

    def synchronize(self) -> None:
        pass  # the gradients of an inner step are this worker's own

    def local_work_counts(self, step: int) -> bool:
        if self.exchange_pending or not self.did_round:
            return False
        if self.closing.active and self.closing.closed(self.outer.rounds):
            self._drop_round_work()
            return False
        return True

    def step(self, step: int, closure: Closure | None = None) -> bool:
        if self.local_work_counts(step):  # a redone step only redoes its exchange
            if self.subspace is not None and step % self.local_steps == 0:
                self._enter_round_subspace()
            self.optimizer.step()
        self.in_sync = False
        self.payload_bytes_last_step = self.wire_bytes_last_step = 0
        if (step + 1) % self.local_steps == 0 or (self.total_steps is not None and step + 1 >= self.total_steps):
            return self.finish()
        return False

    def finish(self) -> bool:
        if self.in_sync:
            return False
        contributors = None
        redo, self.exchange_pending = self.exchange_pending, True  # from here on, a failure redoes only the exchange
        if redo:
            contributors = self.outer.count_contributors(self.did_round)
        elif self.closing.active:
            in_time, contributors = self.closing.finish(self.outer.rounds, self.reducer.world_size)
            if not in_time and self.did_round:
                self._drop_round_work()
        self.outer.apply(self.optimizer.param_groups[0]["lr"], contributors)
        self.exchange_pending = False
        self.did_round = True
        self.payload_bytes_last_step = self.outer.reducer.payload_bytes_last_step
        self.wire_bytes_last_step = self.outer.reducer.wire_bytes_last_step
        self.in_sync = True
        return True

    def _enter_round_subspace(self) -> None:
        """A round's first local step: draw its bases. Where a basis changed, the moments kept in
        the old one mean nothing in the new one, so they start again."""
        assert self.subspace is not None
        for p in self.subspace.begin_round(self.outer.rounds):
            self.optimizer.state.pop(p, None)

    def _drop_round_work(self) -> None:
        """The round closed before this worker finished it: back to the round's start, sending zeros."""
        log.info("round %d closed before this worker finished its local steps; its round work is dropped", self.outer.rounds)
        self.outer.back_to_round_start()
        self.did_round = False

    def membership_may_change(self, steps: int, sync_every: int) -> bool:
        return self.in_sync  # at round starts, where every member holds the global weights

    def generation_failed(self) -> None:
        pass  # the redone step exchanges again what it kept (``exchange_pending``)

    def regrouped(self) -> None:
        pass  # the generation's whole group is found anew at every collective

    def take_rank0_replica(self) -> None:
        # The outer SGD's state is shared; the inner optimizer's is this worker's own.
        broadcast_from_rank0(self.model, self.outer.outer, self.reducer.group)
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
        return {"outer": self.outer.shared_state_dict(), "pending": self.exchange_pending, "in_sync": self.in_sync}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        """Take a donor's round start (into the model too); while its exchange is pending, send zeros in it."""
        self.outer.load_state_dict(state["outer"])
        self.exchange_pending = state["pending"]
        self.did_round = not self.exchange_pending
        self.in_sync = state["in_sync"]  # mid-round as the others are, if a failure let it in there

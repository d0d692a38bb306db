"""Local-step rounds whose exchange runs behind the next round's local steps: a one-round-delayed outer step.

At a round end a worker launches its pseudo-gradient's exchange (on a thread) and goes straight on
with the next round's local steps from its own weights. At the next round end it waits for that
exchange, which has usually finished, applies the outer step to the global weights, and moves its
own weights by as much as the global ones moved, keeping its progress of the round just done; that
progress is what it sends next. The global weights are identical on every replica at all times.
The models are identical at drains: every ``drain_every`` rounds, and at the end, the exchange is
waited for at once and every worker takes the global weights. Evaluations, checkpoints and replica
checks happen there. Vote momentum and error feedback stay exact: a round's payload is encoded
only after the previous one's state was committed.

Under a coordinator, members join at drains, where every member holds the global weights (and so
does a joiner, from its donor's state). When a member fails, the survivors drop the exchange in
flight and the local steps computed behind it, go back to the global weights, and redo the failed
step from there in the next generation: at most two rounds of local work are lost, the global
weights stay identical, and the dropped round's payload never reached vote momentum or error
feedback (its encoding is rolled back). Checkpoints are taken at drains.

An eager method (``Method.eager``, after "eager updates" for overlapped DiLoCo) does not go on from
its own weights: it starts the next round from the global weights moved by the outer step of its
own update (its payload decoded alone), and when the mean arrives it swaps that for the mean's, so
its local steps run near where the global weights will be rather than a whole round of its own
progress away.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain.exchange.base import Closure, ExchangeOptions
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.methods import Method
from disttrain.optim.projected_adamw import ProjectedAdamW


class OverlappedRoundsExchange(LocalRoundsExchange):
    """DiLoCo rounds with the exchange of round r hidden behind the local steps of round r + 1."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, options: ExchangeOptions):
        if options.round_quorum < 1 or options.round_deadline_s is not None:
            raise ValueError(f"method {method.name!r} waits for its exchange one round late; a round quorum or deadline does not apply to it")
        if isinstance(optimizer, ProjectedAdamW):
            raise ValueError(f"method {method.name!r} takes a plain inner optimizer; ProjectedAdamW's subspace rounds do not overlap")
        super().__init__(model, optimizer, method, options, overlap=True)
        self.drain_every = method.drain_every
        self.round_open = False  # local steps were taken since the last launch

    def local_work_counts(self, step: int) -> bool:
        return True

    def step(self, step: int, closure: Closure | None = None) -> bool:
        self.optimizer.step()
        self.in_sync, self.round_open = False, True
        self.payload_bytes_last_step = self.wire_bytes_last_step = 0
        if (step + 1) % self.local_steps == 0 or (self.total_steps is not None and step + 1 >= self.total_steps):
            last = self.total_steps is not None and step + 1 >= self.total_steps
            return self._end_round(drain=last)
        return False

    def finish(self) -> bool:
        return False if self.in_sync else self._end_round(drain=True)

    def generation_failed(self) -> None:
        """Back to the global weights, which every member holds alike: the exchange in flight and the
        local work since are dropped, and the redone step starts a round from there."""
        self.outer.abandon()
        self.round_open = False
        self.in_sync = True

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        super().load_shared_state_dict(state)
        self.round_open = False  # a donor's state is a drain's, or the global weights after a failure

    def _end_round(self, drain: bool) -> bool:
        """Complete the exchange in flight, launch this round's, and wait for it too at a drain; True if it launched."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self.outer.pending:
            self.outer.complete(lr, keep_progress=True)
        launched = self.round_open
        if launched:
            self.outer.launch(inner_lr=lr)
            self.round_open = False
            self.payload_bytes_last_step = self.reducer.payload_bytes_last_step
            self.wire_bytes_last_step = self.reducer.wire_bytes_last_step
        if drain or (self.outer.rounds + 1) % self.drain_every == 0:
            self.outer.complete(lr)
            self.in_sync = True
        return launched

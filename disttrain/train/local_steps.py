"""Local-step rounds (DiLoCo): H local steps, then one compressed exchange of the pseudo-gradient.

Every worker runs ``local_steps`` AdamW steps on its own data with no communication. At the end
of a round, the pseudo-gradient (the round's starting weights minus the current ones) goes
through the same CompressedAllReduce as a per-step gradient would, and the outer step (SGD,
Nesterov when the method has outer momentum; see ``outer.py``) applies the average to the
starting weights. Replicas are identical at round ends only;
in between every worker holds its own weights and its own inner optimizer state.

Under elastic membership, members switch generations at round starts. If a member dies during a
round, the survivors' exchange fails and rolls back; they regroup and redo only the exchange,
keeping their round's local work. A worker admitted at that point receives the round's starting
weights and sends a zero pseudo-gradient, and the average is taken over the members that did
the round.

With a round quorum or deadline (see ``rounds.py``), a round closes without waiting for
stragglers: a worker that had not finished its local steps by then drops them, sends a zero
pseudo-gradient, and starts the next round from the new global weights with everyone else.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from disttrain.comm.link import LinkEmulator
from disttrain.methods import Method
from disttrain.optim.local_subspace import LocalSubspace
from disttrain.train.config import TrainConfig
from disttrain.train.engines import build_optimizer, forward_loss
from disttrain.train.outer import OuterStep
from disttrain.train.rounds import RoundClosing
from disttrain.train.task import Batch

log = logging.getLogger(__name__)


class LocalStepsEngine:
    """Inner AdamW for ``method.local_steps`` steps, then the compressed outer step."""

    def __init__(self, model: torch.nn.Module, method: Method, config: TrainConfig, group=None, elastic: bool = False):
        if method.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {method.local_steps}")
        self.model = model
        self.precision = config.precision
        self.local_steps = method.local_steps
        self.last_step = config.steps  # the run ends on a round boundary, however H divides it
        link = LinkEmulator(config.link_mbit) if config.link_mbit else None
        self.outer = OuterStep(list(model.parameters()), method, config.seed, config.peak_lr, group, link, elastic)
        self.reducer = self.outer.reducer
        self.subspace: LocalSubspace | None = None
        if method.optimizer == "projected_adamw":
            self.subspace = LocalSubspace(self.reducer.params, self.reducer.spec, config.seed)
        self.optimizer = build_optimizer(self.reducer.params, method, config, source=self.subspace)
        self.in_sync = True
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self.exchange_pending: int | None = None  # the round-end step whose exchange failed
        # False for a worker admitted while its round's exchange was pending, or one the round closed without
        self.did_round = True
        self.closing = RoundClosing(config.round_quorum, config.round_deadline_s)
        self._last_loss = 0.0

    @property
    def rounds(self) -> int:
        return self.outer.rounds

    def step(self, step: int, batch: Batch) -> float:
        retry = self.exchange_pending == step
        if not retry and self.did_round and self.closing.active and self.closing.closed(self.rounds):
            self._drop_round_work()
        if not retry and self.did_round:
            if self.subspace is not None and step % self.local_steps == 0:
                self._enter_round_subspace()
            self.optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(self.model, batch, self.precision)
            loss.backward()
            self.optimizer.step()
            self._last_loss = loss.item()
        self.payload_bytes_last_step = self.wire_bytes_last_step = 0
        self.in_sync = (step + 1) % self.local_steps == 0 or step + 1 >= self.last_step
        if self.in_sync:
            self.exchange_pending = step  # from here on, a failure redoes only the exchange
            contributors = None
            if retry:
                contributors = self.outer.count_contributors(self.did_round)
            elif self.closing.active:
                in_time, contributors = self.closing.finish(self.rounds, self.reducer.world_size)
                if not in_time and self.did_round:
                    self._drop_round_work()
            self.outer.apply(self.optimizer.param_groups[0]["lr"], contributors)
            self.payload_bytes_last_step = self.outer.reducer.payload_bytes_last_step
            self.wire_bytes_last_step = self.outer.reducer.wire_bytes_last_step
            self.exchange_pending = None
            self.did_round = True
        return self._last_loss

    def _enter_round_subspace(self) -> None:
        """A round's first local step: draw its bases. Where a basis changed, the moments kept in
        the old one mean nothing in the new one, so they start again."""
        for p in self.subspace.begin_round(self.rounds):
            self.optimizer.state.pop(p, None)

    def _drop_round_work(self) -> None:
        """The round closed before this worker finished it: back to the round's start, sending zeros."""
        log.info("round %d closed before this worker finished its local steps; its round work is dropped", self.rounds)
        self.outer.back_to_round_start()
        self.did_round = False

    # --- elastic membership -------------------------------------------------------------
    def membership_check_due(self, step: int, sync_every: int) -> bool:
        """Generations change at round starts, where every member holds the global weights."""
        return step % self.local_steps == 0

    def replica_parameters(self) -> list[torch.Tensor]:
        return self.outer.global_params

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a worker needs to resume, its own inner state included."""
        return {**self.shared_state_dict(), "reducer": self.reducer.state_dict(), "inner": self.optimizer.state_dict()}

    def shared_state_dict(self) -> dict[str, Any]:
        """The round's starting weights, the outer optimizer and where the round stands."""
        return {**self.outer.shared_state_dict(), "exchange_pending": self.exchange_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a round's start: its global weights go into the model too. A worker that
        receives them while the round's exchange is pending sends zeros in it."""
        self.outer.load_state_dict(state)
        if "inner" in state:
            self.optimizer.load_state_dict(state["inner"])
        self.exchange_pending = state["exchange_pending"]
        self.did_round = self.exchange_pending is None or "inner" in state

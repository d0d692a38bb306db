"""The round-end half of local-step training (DiLoCo): one compressed exchange of the pseudo-gradient
and the outer step, which moves every replica to the same weights.

Between round ends each worker holds its own weights; ``global_params`` keep the round's starting
weights, which every replica holds bit for bit. At a round end the pseudo-gradient (start minus
current weights) goes through the same CompressedAllReduce as a per-step gradient would, the outer
SGD (Nesterov when the method has outer momentum) applies the average to the starting weights, and
the result becomes every replica's weights and the next round's start. The built-in trainer's
local-step engine and ``disttrain.Session`` in a user's loop share it.

With ``overlap`` the exchange runs on a thread while the worker's next round computes (launch(),
later complete()). The pseudo-gradient is then taken from where this worker's own round started
(``round_start``), and complete() moves the worker's weights by as much as the global ones moved,
so that the local progress made meanwhile is kept and sent with the next exchange. An eager
method instead starts the next round from the outer step of this worker's own update, and
complete() swaps that step for the mean's (see ``exchange/overlapped_rounds.py``).

A method with ``round_start="bf16"`` keeps the round's start of every matrix in bf16, half the
memory: the outer step is taken in fp32 and rounded stochastically with a key every replica
shares (``stochastic_rounding.py``), and the model starts each round at exactly that start, so the
pseudo-gradient stays exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import CompressedAllReduce
from disttrain.comm.background import InBackground
from disttrain.comm.device import collective_device
from disttrain.comm.link import LinkEmulator
from disttrain.comm.waiting import wait_work
from disttrain.kernels.seeded import StreamKey
from disttrain.methods import Method
from disttrain.train.stochastic_rounding import stochastic_round_to_bf16


class OuterStep:
    """A round's compressed exchange and outer step, and the state every replica shares between rounds."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        method: Method,
        seed: int,
        peak_lr: float,
        group: dist.ProcessGroup | None = None,
        link: LinkEmulator | None = None,
        elastic: bool = False,
        overlap: bool = False,
    ):
        self.reducer = CompressedAllReduce(
            params, method.compression, seed, group, overlap=False, link=link, fixed_membership=not elastic
        )
        self.params = self.reducer.params
        self.seed = seed
        halved = method.round_start == "bf16"
        if halved and (method.outer_momentum > 0 or overlap):
            raise ValueError(
                f"method {method.name!r} keeps its round start in bf16, which takes a plain outer SGD step "
                "(outer_momentum 0) without overlap"
            )
        # The current weights start round 0 (a matrix's rounded to bf16, in the model too, where the start is kept so).
        self.global_params = [
            p.detach().to(torch.bfloat16 if halved and p.dim() >= 2 else p.dtype, copy=True) for p in self.params
        ]
        if halved:
            with torch.no_grad():
                for p, start in zip(self.params, self.global_params):
                    p.copy_(start)
        self.outer_lr, self.peak_lr, self.lr_scheduled = method.outer_lr, peak_lr, method.outer_lr_scheduled
        self.outer = torch.optim.SGD(
            self.global_params, lr=method.outer_lr, momentum=method.outer_momentum, nesterov=method.outer_momentum > 0
        )
        self.rounds = 0
        self.overlap = overlap
        self.eager = method.eager
        self.reducer.keep_own = method.eager
        # Where this worker's current round started: the global weights, unless an exchange overlaps.
        self.round_start = [t.clone() for t in self.global_params] if overlap else self.global_params
        self.pending = False  # an exchange was launched and is not completed yet
        self._contributors: int | None = None
        self._in_flight: InBackground | None = None

    def apply(self, inner_lr: float, contributors: int | None = None) -> None:
        """Average the compressed pseudo-gradients and move every replica to the same weights.

        ``inner_lr`` is the inner optimizer's current learning rate (a scheduled outer lr follows
        it); ``contributors`` is how many workers did the round (None: all of them). If the
        collective fails, CompressedAllReduce rolls its state back and raises before any weight
        has changed, so the exchange can be redone.
        """
        self.launch(contributors)
        self.complete(inner_lr)

    def launch(self, contributors: int | None = None, inner_lr: float | None = None) -> None:
        """Encode this worker's pseudo-gradient (round start minus current weights) and start its exchange.
        Under overlap the next round starts from this worker's weights, or, eager, from the outer step of
        its own update at the outer lr that ``inner_lr`` gives."""
        with torch.no_grad():
            for p, start in zip(self.params, self.round_start):
                p.grad = start - p
        self.reducer.start_step(self.rounds)
        self.reducer.launch_all()
        for p in self.params:
            p.grad = None
        self.pending, self._contributors = True, contributors
        if self.overlap:
            own = self.reducer.own_updates() if self.eager else None  # on this thread, before the exchange's own starts
            self._in_flight = InBackground(lambda: self.reducer.finish(contributors), "disttrain-outer-exchange")
            with torch.no_grad():
                if own is not None:
                    lr = self._scheduled_lr(self.peak_lr if inner_lr is None else inner_lr)
                    for p, start, current, update in zip(self.params, self.global_params, self.round_start, own):
                        current.copy_(start).sub_(update.to(current.dtype), alpha=lr)
                        p.copy_(current)
                else:
                    for p, current in zip(self.params, self.round_start):
                        current.copy_(p)

    def _scheduled_lr(self, inner_lr: float) -> float:
        """The outer lr, following the inner one's schedule when the method says so."""
        return self.outer_lr * inner_lr / self.peak_lr if self.lr_scheduled else self.outer_lr

    def complete(self, inner_lr: float, keep_progress: bool = False) -> None:
        """Wait for the launched exchange and take the outer step on the global weights; this worker's
        weights become them, or with ``keep_progress`` move by as much as they did (the progress made
        since the launch stays on top)."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.wait()
        else:
            self.reducer.finish(self._contributors)
        self.pending = False
        self.reducer.write_gradients()
        self.outer.param_groups[0]["lr"] = self._scheduled_lr(inner_lr)
        for index, (p, start) in enumerate(zip(self.params, self.global_params)):
            if start.dtype == torch.bfloat16 and p.dtype != torch.bfloat16:
                self._step_halved(index, start, p.grad)
                p.grad = None
            else:
                start.grad, p.grad = p.grad, None
        self.outer.step()  # the starts kept at full precision
        with torch.no_grad():
            for p, start, current in zip(self.params, self.global_params, self.round_start):
                if keep_progress:
                    p.add_(start - current)
                else:
                    p.copy_(start)
                if self.overlap:
                    current.copy_(start)
                start.grad = None
        self.reducer.commit()
        self.rounds += 1

    def _step_halved(self, index: int, start: torch.Tensor, update: torch.Tensor) -> None:
        """The outer SGD step of a start kept in bf16: taken in fp32, rounded stochastically with a shared key."""
        moved = start.float().sub_(update.float(), alpha=self.outer.param_groups[0]["lr"])
        start.copy_(stochastic_round_to_bf16(moved, StreamKey.derive(self.seed, self.rounds, index)))

    def count_contributors(self, did_round: bool) -> int:
        """Collective: how many members did this round's local steps (a worker admitted since its start did not)."""
        count = torch.tensor([int(did_round)], device=collective_device(self.reducer.group))
        wait_work(dist.all_reduce(count, group=self.reducer.group, async_op=True))
        return int(count.item())

    def adopt_current_weights(self) -> None:
        """Take the model's weights as the round's start (after a replica repair copied rank 0's in)."""
        with torch.no_grad():
            for p, start, current in zip(self.params, self.global_params, self.round_start):
                start.copy_(p)
                current.copy_(p)

    def abandon(self) -> None:
        """Drop the exchange in flight (its waits give up once the generation is broken) and this
        worker's work since the global weights, which become its weights and its round's start."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            try:
                in_flight.wait()
            except RuntimeError:
                pass  # the broken generation's collective; its step is dropped either way
        self.reducer.rollback()
        self.pending = False
        with torch.no_grad():
            for p, start, current in zip(self.params, self.global_params, self.round_start):
                p.copy_(start)
                current.copy_(start)
                p.grad = None  # a launch may have left the pseudo-gradient there

    def back_to_round_start(self) -> None:
        """Drop this worker's local work of the round: its weights become the round's start again."""
        with torch.no_grad():
            for p, start in zip(self.params, self.global_params):
                p.copy_(start)

    def shared_state_dict(self) -> dict[str, Any]:
        """What every replica holds alike: the exchange's shared state, the outer optimizer, the round and its start."""
        return {
            "reducer": self.reducer.shared_state_dict(),
            "outer": self.outer.state_dict(),
            "rounds": self.rounds,
            "global": [t.clone() for t in self.global_params],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a round's start (its weights go into the model too) and the exchange state saved with it."""
        self.reducer.load_state_dict(state["reducer"])
        self.outer.load_state_dict(state["outer"])
        self.rounds = state["rounds"]
        with torch.no_grad():
            for p, start, current, saved in zip(self.params, self.global_params, self.round_start, state["global"]):
                start.copy_(saved)
                current.copy_(saved)
                p.copy_(saved)

"""Local-step rounds (DiLoCo): H local steps, then one compressed exchange of the pseudo-gradient.

Every worker runs ``local_steps`` AdamW steps on its own data with no communication. At the end
of a round, the pseudo-gradient (the round's starting weights minus the current ones) goes
through the same CompressedAllReduce as a per-step gradient would, and an outer Nesterov SGD
step applies the average to the starting weights. Replicas are identical at round ends only;
in between every worker holds its own weights and its own inner optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain.comm.allreduce import CompressedAllReduce
from disttrain.comm.link import LinkEmulator
from disttrain.methods import Method
from disttrain.train.config import TrainConfig
from disttrain.train.engines import forward_loss

Batch = tuple[torch.Tensor, torch.Tensor]


class LocalStepsEngine:
    """Inner AdamW for ``method.local_steps`` steps, then the compressed outer step."""

    def __init__(self, model: torch.nn.Module, method: Method, config: TrainConfig, group=None):
        if method.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {method.local_steps}")
        self.model = model
        self.precision = config.precision
        self.local_steps = method.local_steps
        self.last_step = config.steps  # the run ends on a round boundary, however H divides it
        link = LinkEmulator(config.link_mbit) if config.link_mbit else None
        self.reducer = CompressedAllReduce(model.parameters(), method.compression, config.seed, group, overlap=False, link=link)
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            self.reducer.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        )
        self.global_params = [p.detach().clone() for p in self.reducer.params]
        self.outer = torch.optim.SGD(
            self.global_params, lr=method.outer_lr, momentum=method.outer_momentum, nesterov=True
        )
        self.rounds = 0
        self.in_sync = True
        self.dense_bytes_per_step = self.reducer.dense_bytes_per_step
        self.payload_bytes_last_step = 0

    def step(self, step: int, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(self.model, batch, self.precision)
        loss.backward()
        self.optimizer.step()
        self.payload_bytes_last_step = 0
        self.in_sync = (step + 1) % self.local_steps == 0 or step + 1 >= self.last_step
        if self.in_sync:
            self._outer_step()
        return loss.item()

    def _outer_step(self) -> None:
        """Average the compressed pseudo-gradients and move every replica to the same weights.

        If the collective fails, CompressedAllReduce rolls its state back and raises before any
        weight has changed, so the round can be redone.
        """
        with torch.no_grad():
            for p, start in zip(self.reducer.params, self.global_params):
                p.grad = start - p
        self.reducer.start_step(self.rounds)
        self.reducer.finish()
        self.reducer.write_gradients()
        for p, start in zip(self.reducer.params, self.global_params):
            start.grad = p.grad
        self.outer.step()
        with torch.no_grad():
            for p, start in zip(self.reducer.params, self.global_params):
                p.copy_(start)
                start.grad = None
                p.grad = None
        self.reducer.commit()
        self.rounds += 1
        self.payload_bytes_last_step = self.reducer.payload_bytes_last_step

    def state_dict(self) -> dict[str, Any]:
        """Everything a worker needs to resume at a round boundary, its own inner state included."""
        return {
            "reducer": self.reducer.state_dict(),
            "inner": self.optimizer.state_dict(),
            "outer": self.outer.state_dict(),
            "rounds": self.rounds,
        }

    def shared_state_dict(self) -> dict[str, Any]:
        return {"reducer": self.reducer.shared_state_dict(), "outer": self.outer.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a round boundary: the model's weights (already loaded) become the round start."""
        self.reducer.load_state_dict(state["reducer"])
        if "inner" in state:
            self.optimizer.load_state_dict(state["inner"])
        self.outer.load_state_dict(state["outer"])
        self.rounds = state["rounds"]
        with torch.no_grad():
            for p, start in zip(self.reducer.params, self.global_params):
                start.copy_(p)

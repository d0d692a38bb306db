"""What a Session asks of its exchange."""

from __future__ import annotations

from typing import Any, ContextManager, Protocol

import torch


class Exchange(Protocol):
    reducer: Any  # the CompressedAllReduce it sends through
    in_sync: bool  # whether every replica holds the same weights after the last step
    payload_bytes_last_step: int  # what this worker put into collectives in the last step
    wire_bytes_last_step: int  # what those collectives moved per worker
    dense_bytes_per_step: int  # what a dense fp32 all-reduce of the exchanged parameters moves

    def no_sync(self) -> ContextManager[None]:
        """Backward passes inside accumulate locally; the step after them sends the sum."""

    def synchronize(self) -> None:
        """Make ``.grad`` what the optimizer step will use (the average, for per-step methods)."""

    def step(self, step: int) -> bool:
        """Take the user's optimizer step number ``step`` (0-based); True when it exchanged."""

    @property
    def shared_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state every replica holds alike (what a replica repair copies from rank 0)."""

    def adopt_repaired_weights(self) -> None:
        """After a repair copied rank 0's weights into the model: make the exchange's own copies agree."""

    def finish(self) -> bool:
        """Exchange what is pending, so that replicas agree; True when it exchanged."""

    def replica_parameters(self) -> list[torch.Tensor]:
        """The parameters every replica holds alike whenever membership may change."""

    def state_dict(self) -> dict[str, Any]:
        """This worker's exchange state, for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""

    def shared_state_dict(self) -> dict[str, Any]:
        """What a worker joining now needs to match the others (never a worker's own residuals)."""

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        """Take a donor's shared_state_dict()."""

"""What vote payloads share: a momentum this worker alone keeps, and votes that are update directions."""

from __future__ import annotations

from typing import Any

import torch

from disttrain.compress.base import Compressor


class VoteCompressor(Compressor):
    """A payload of votes (bytes) on the update direction, computed from this worker's own momentum.

    Subclasses encode and decode; ``encode`` leaves the new momentum (flat, fp32) in ``_pending``,
    which lands on commit(), kept in ``momentum_dtype`` (bf16 halves it). Votes are the update
    itself, so reconstruction is the identity. The momentum is not shared state: a joiner starts
    its own from zero.
    """

    summable = False

    def __init__(self, shape: torch.Size, momentum_dtype: torch.dtype = torch.float32):
        self.shape = torch.Size(shape)
        self.momentum_dtype = momentum_dtype
        self.momentum: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    def momentum_or_zeros(self, like: torch.Tensor) -> torch.Tensor:
        """The kept momentum in fp32 (flat), zeros before the first commit."""
        return torch.zeros_like(like) if self.momentum is None else self.momentum.float()

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.uint8

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return coeffs.reshape(self.shape)

    def commit(self) -> None:
        if self._pending is not None:
            self.momentum, self._pending = self._pending.to(self.momentum_dtype), None

    def rollback(self) -> None:
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.momentum is None else {"momentum": self.momentum.clone()}

    def shared_state_dict(self) -> dict[str, Any]:
        """The momentum belongs to this worker alone."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state.get("momentum")
        self.momentum = None if momentum is None else momentum.to(self.momentum_dtype).reshape(-1).clone()
        self._pending = None

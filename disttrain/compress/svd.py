"""GaLore's basis: the top-r singular vectors of a gradient, refreshed every T steps.

Replicas must hold the same basis bit for bit, and an SVD of different local gradients (or
even of the same one on different hardware) does not guarantee that. So one worker (rank 0)
computes the basis from its own gradient plus residual, and the communication layer
broadcasts it; the compressor only proposes and accepts bases.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain import kernels
from disttrain.compress.lowrank import Basis


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive.

    LAPACK leaves the sign of singular vectors free; fixing it keeps consecutive bases
    aligned, which matters because Adam moments carry over a refresh.
    """
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[largest, torch.arange(vectors.shape[1], device=vectors.device)])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


class SVDBasis(Basis):
    """Left singular vectors U[:, :r] of the oriented (d x L) gradient."""

    def __init__(self, reduced_dim: int, rank: int, refresh_every: int = 200):
        super().__init__(reduced_dim, rank)
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.refresh_every = refresh_every
        self.matrix: torch.Tensor | None = None
        self.refresh_requested = False

    def needs_shared_basis(self, step: int) -> bool:
        return self.matrix is None or self.refresh_requested or step % self.refresh_every == 0

    def request_refresh(self) -> None:
        self.refresh_requested = True

    def propose(self, oriented: torch.Tensor) -> torch.Tensor:
        u, _, _ = torch.linalg.svd(oriented.float(), full_matrices=False)
        return canonical_signs(u[:, : self.rank]).contiguous()

    def set(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.float().contiguous()
        self.refresh_requested = False

    def _require(self) -> torch.Tensor:
        if self.matrix is None:
            raise RuntimeError("the SVD basis has not been set yet: call set_basis() at the first step")
        return self.matrix

    def explicit(self) -> torch.Tensor:
        return self._require()

    def project(self, oriented: torch.Tensor) -> torch.Tensor:
        return kernels.project(oriented, self._require(), "left")

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return kernels.reconstruct(coeffs, self._require(), "left")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"refresh_requested": self.refresh_requested}
        if self.matrix is not None:
            state["matrix"] = self.matrix.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrix = state["matrix"].float().clone() if "matrix" in state else None
        self.refresh_requested = bool(state.get("refresh_requested", False))

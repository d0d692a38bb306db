"""A random basis regenerated from the job seed: zero bytes to agree on."""

from __future__ import annotations

from typing import Any

import torch

from disttrain import kernels
from disttrain.compress.lowrank import Basis
from disttrain.kernels.seeded import Distribution, StreamKey


class SeededBasis(Basis):
    """P drawn from a counter-based hash of (job seed, refresh index, parameter id).

    The refresh index is step // refresh_every, so refresh_every=1 draws a new basis every step.
    Nothing is stored or sent: every worker regenerates the same matrix bit for bit.
    """

    def __init__(
        self,
        reduced_dim: int,
        rank: int,
        seed: int,
        param_id: int,
        refresh_every: int = 1,
        distribution: Distribution = "gaussian",
    ):
        super().__init__(reduced_dim, rank)
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.seed = seed
        self.param_id = param_id
        self.refresh_every = refresh_every
        self.distribution = distribution
        self.refresh_index = 0

    @property
    def key(self) -> StreamKey:
        return StreamKey.derive(self.seed, self.refresh_index, self.param_id)

    def begin_step(self, step: int) -> None:
        self.refresh_index = step // self.refresh_every

    @property
    def seeded(self) -> kernels.SeededMatrix:
        """The current P as the kernels take it: generated where it is used, never stored."""
        return kernels.SeededMatrix(self.key, self.reduced_dim, self.rank, self.distribution)

    def matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return kernels.seeded_matrix(self.key, self.reduced_dim, self.rank, self.distribution, device=device)

    def explicit(self) -> torch.Tensor:
        return self.matrix()

    def project(self, oriented: torch.Tensor) -> torch.Tensor:
        return kernels.project(oriented, self.seeded, "left")

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return kernels.reconstruct(coeffs, self.seeded, "left")

    def state_dict(self) -> dict[str, Any]:
        return {"refresh_index": self.refresh_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refresh_index = int(state["refresh_index"])

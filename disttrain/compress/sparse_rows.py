"""GRASS's structured sparse projection: P's columns are unit vectors, so P^T G is r rows of G.

At a refresh, rank 0 picks the r rows of largest norm in its gradient (plus residual, under
error feedback) and broadcasts their indices: r numbers instead of a d x r basis. Projecting
is a row gather and reconstructing a row scatter, with no multiplications.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain.compress.svd import SVDBasis


class SparseRowsBasis(SVDBasis):
    """The r rows of largest norm in rank 0's oriented gradient at the last refresh."""

    def __init__(self, reduced_dim: int, rank: int, refresh_every: int = 200):
        super().__init__(reduced_dim, rank, refresh_every)
        self.rows: torch.Tensor | None = None

    def propose(self, oriented: torch.Tensor) -> torch.Tensor:
        """The chosen rows' indices, ascending, as the float32 the broadcast carries (exact below 2**24)."""
        return oriented.float().norm(dim=1).topk(self.rank).indices.sort().values.float()

    def set(self, matrix: torch.Tensor) -> None:
        """Take the basis as explicit() gives it: unit columns."""
        rows = matrix.argmax(dim=0)
        if not torch.equal(matrix.float(), torch.eye(self.reduced_dim)[:, rows]):
            raise ValueError("a sparse-rows basis is a d x r matrix of unit columns e_i; this matrix is not one")
        self.receive(rows.float())

    def shared_numel(self) -> int:
        return self.rank

    def receive(self, shared: torch.Tensor) -> None:
        rows = shared.long()
        distinct = rows.numel() == self.rank and rows.unique().numel() == self.rank
        if not distinct or int(rows.min()) < 0 or int(rows.max()) >= self.reduced_dim:
            raise ValueError(
                f"a sparse-rows basis needs {self.rank} distinct row indices in [0, {self.reduced_dim}), got {rows.tolist()}: "
                "the basis was written for a different model or rank"
            )
        self.rows = rows
        super().set(torch.eye(self.reduced_dim)[:, rows])  # SVDBasis's schedule reads its matrix

    def _require_rows(self) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("the sparse-rows basis has not been set yet: call set_basis() at the first step")
        return self.rows

    def project(self, oriented: torch.Tensor) -> torch.Tensor:
        return oriented.float().index_select(0, self._require_rows().to(oriented.device))

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        rows = self._require_rows().to(coeffs.device)
        return coeffs.new_zeros(self.reduced_dim, coeffs.shape[1]).index_copy_(0, rows, coeffs)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"refresh_requested": self.refresh_requested}
        if self.rows is not None:
            state["rows"] = self.rows.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.matrix = None, None
        if "rows" in state:
            self.receive(state["rows"].float())
        self.refresh_requested = bool(state.get("refresh_requested", False))

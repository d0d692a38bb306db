"""One-sided low-rank projection R = P^T G against a basis shared by every worker."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

from disttrain.compress.base import Compressor, check_gradient

SideChoice = Literal["auto", "left", "right"]


class Basis(ABC):
    """An orthonormal-ish basis P (d x r) that every worker holds bit for bit."""

    def __init__(self, reduced_dim: int, rank: int):
        self.reduced_dim = reduced_dim
        self.rank = rank

    @abstractmethod
    def project(self, oriented: torch.Tensor) -> torch.Tensor:
        """P^T G' for a (d x L) matrix G' -> (r x L) coefficients in fp32."""

    @abstractmethod
    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        """P R for (r x L) coefficients -> (d x L)."""

    @abstractmethod
    def explicit(self) -> torch.Tensor:
        """The current P as a (d x r) fp32 matrix (optimizers carry their moments across a refresh with it)."""

    def begin_step(self, step: int) -> None:
        """Pick the basis for ``step`` (seeded bases move to the next refresh index here)."""

    def needs_shared_basis(self, step: int) -> bool:
        return False

    def request_refresh(self) -> None:
        """Only data-dependent bases refresh on request; seeded ones follow their schedule."""

    def propose(self, oriented: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not data-dependent")

    def set(self, matrix: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not data-dependent")

    def shared_numel(self) -> int:
        """How many fp32 values a refresh broadcasts: the d x r matrix unless the basis says less."""
        return self.reduced_dim * self.rank

    def receive(self, shared: torch.Tensor) -> None:
        """Take the broadcast of what rank 0 proposed (flat)."""
        self.set(shared.reshape(self.reduced_dim, self.rank))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


def choose_side(shape: tuple[int, int], side: SideChoice) -> Literal["left", "right"]:
    """'auto' reduces the longer dimension, which gives the smallest payload: r * min(m, n)."""
    if side == "auto":
        return "left" if shape[0] >= shape[1] else "right"
    if side not in ("left", "right"):
        raise ValueError(f"unknown projection side {side!r}; use 'auto', 'left' or 'right'")
    return side


def as_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """Views an N-d weight (N >= 2) as (shape[0], prod(rest)), as conv weights are flattened."""
    return shape[0], shape[1:].numel()


class LowRankCompressor(Compressor):
    """Projects a gradient on ``basis`` and sends the r x L coefficients.

    The gradient is oriented so that the reduced dimension comes first (G' = G for the left
    side, G^T for the right side); coefficients are always (rank x L), one row per basis
    direction, which is also the row layout int8 scales use.
    """

    def __init__(
        self,
        shape: torch.Size,
        basis: Basis,
        side: Literal["left", "right"],
        wire_dtype: torch.dtype = torch.float32,
    ):
        self.shape = torch.Size(shape)
        m, n = as_matrix_shape(self.shape)
        if basis.rank >= min(m, n):
            raise ValueError(
                f"rank {basis.rank} must be smaller than min(m, n) = {min(m, n)} for a {m}x{n} weight; "
                f"lower the rank or send this parameter dense"
            )
        self.side = side
        self.basis = basis
        self.other_dim = n if side == "left" else m
        self._wire_dtype = wire_dtype

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return (self.basis.rank, self.other_dim)

    @property
    def wire_dtype(self) -> torch.dtype:
        return self._wire_dtype

    def wire_numel(self) -> int:
        return self.basis.rank * self.other_dim

    def _orient(self, grad: torch.Tensor) -> torch.Tensor:
        matrix = grad.detach().reshape(as_matrix_shape(self.shape))
        return matrix if self.side == "left" else matrix.t()

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        check_gradient(grad, self.shape)
        return self.basis.project(self._orient(grad)).reshape(-1).to(self._wire_dtype)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        return wire.float().reshape(self.coeff_shape)

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        oriented = self.basis.reconstruct(coeffs)
        matrix = oriented if self.side == "left" else oriented.t()
        return matrix.reshape(self.shape)

    def begin_step(self, step: int) -> None:
        self.basis.begin_step(step)

    def needs_shared_basis(self, step: int) -> bool:
        return self.basis.needs_shared_basis(step)

    def propose_basis(self, grad: torch.Tensor) -> torch.Tensor:
        return self.basis.propose(self._orient(grad).float())

    def request_refresh(self) -> None:
        self.basis.request_refresh()

    def captured_energy(self, grad: torch.Tensor) -> tuple[float, float]:
        oriented = self._orient(grad).float()
        return self.basis.project(oriented).square().sum().item(), oriented.square().sum().item()

    def basis_numel(self) -> int:
        return self.basis.shared_numel()

    def basis_matrix(self) -> torch.Tensor:
        return self.basis.explicit()

    def set_basis(self, basis: torch.Tensor) -> None:
        self.basis.receive(basis)

    def state_dict(self) -> dict[str, Any]:
        return self.basis.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.basis.load_state_dict(state)

"""A projection basis as the kernels see it: a stored matrix P, or a seeded one never stored.

Every projection entry point takes ``basis: Basis``. The torch references materialise it with
``dense``; the Triton kernels call ``basis_block`` for each tile, which loads a stored P or
generates the seeded entries in registers, and get their scalar arguments from ``operands``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

import torch

from disttrain.kernels._triton import jit, tl
from disttrain.kernels.seeded import (
    Distribution,
    StreamKey,
    check_counter_space,
    entry_scale,
    kernel_words,
    seeded_block,
    seeded_matrix,
)

Side = Literal["left", "right"]

# Kernel codes for where the basis comes from (the BASIS constexpr).
STORED, GAUSSIAN, RADEMACHER = 0, 1, 2
_SEEDED_CODES = {"gaussian": GAUSSIAN, "rademacher": RADEMACHER}


@dataclass(frozen=True)
class SeededMatrix:
    """The seeded P (rows x rank) for ``key``: a name for the matrix, regenerated wherever it is used."""

    key: StreamKey
    rows: int
    rank: int
    distribution: Distribution = "gaussian"

    def __post_init__(self) -> None:
        check_counter_space(self.rows, self.rank)
        entry_scale(self.rows, self.distribution)  # refuses an unknown distribution now


Basis = Union[torch.Tensor, SeededMatrix]


def basis_shape(basis: Basis) -> tuple[int, int]:
    """(rows, rank) of P."""
    return (basis.rows, basis.rank) if isinstance(basis, SeededMatrix) else (basis.shape[0], basis.shape[1])


def dense(basis: Basis, device: torch.device) -> torch.Tensor:
    """P as an fp32 tensor on ``device`` (the references' view of any basis)."""
    if isinstance(basis, SeededMatrix):
        return seeded_matrix(basis.key, basis.rows, basis.rank, basis.distribution, device=device)
    return basis.float()


def reduced_dim(shape: torch.Size | tuple[int, int], side: Side) -> int:
    """The dimension a projection on ``side`` removes: rows for 'left', columns for 'right'."""
    check_side(side)
    return shape[0] if side == "left" else shape[1]


def check_side(side: Side) -> None:
    """Refuses a side that is neither 'left' nor 'right'."""
    if side not in ("left", "right"):
        raise ValueError(f"unknown projection side {side!r}; use 'left' or 'right'")


def oriented(matrix: torch.Tensor, side: Side) -> torch.Tensor:
    """The view whose first dimension is the one P acts on: the matrix itself (left) or its transpose (right)."""
    check_side(side)
    return matrix if side == "left" else matrix.t()


def check_rows(basis: Basis, rows: int, what: str) -> None:
    """Names the mismatch when P does not have as many rows as the dimension it reduces."""
    basis_rows = basis_shape(basis)[0]
    if basis_rows != rows:
        raise ValueError(f"{what} has {rows} entries along the projected side, but the basis has {basis_rows} rows")


def check_same_shape(tensor: torch.Tensor | None, like: torch.Tensor, what: str) -> None:
    """Names the mismatch when an optional companion tensor (a residual, an addend) has the wrong shape."""
    if tensor is not None and tensor.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}; it must match {tuple(like.shape)}")


class Operands(NamedTuple):
    """The kernel arguments that describe a basis."""

    tensor: torch.Tensor
    stride_row: int
    stride_rank: int
    rank: int
    k0: int
    k1: int
    scale: float
    code: int


def operands(basis: Basis, placeholder: torch.Tensor) -> Operands:
    """Kernel arguments for ``basis``; a seeded basis passes ``placeholder`` as its (unread) pointer."""
    if isinstance(basis, SeededMatrix):
        k0, k1 = kernel_words(basis.key)
        scale = entry_scale(basis.rows, basis.distribution)
        return Operands(placeholder, 0, 0, basis.rank, k0, k1, scale, _SEEDED_CODES[basis.distribution])
    if basis.device != placeholder.device:
        raise ValueError(f"the basis is on {basis.device} but the data is on {placeholder.device}")
    return Operands(basis, basis.stride(0), basis.stride(1), basis.shape[1], 0, 0, 1.0, STORED)


@jit()
def basis_block(p_ptr, stride_row, stride_rank, rows, ranks, n_rows, rank, k0, k1, scale, BASIS: tl.constexpr):
    """P[rows, ranks] in fp32 for broadcastable int32 index blocks.

    Outside the n_rows x rank matrix a stored basis reads as zero and a seeded one as some
    finite value: callers mask the other operand of the product there.
    """
    if BASIS == 0:  # STORED (kernels cannot read Python globals)
        mask = (rows < n_rows) & (ranks < rank)
        block = tl.load(p_ptr + rows.to(tl.int64) * stride_row + ranks * stride_rank, mask=mask, other=0.0)
        values = block.to(tl.float32)
    else:
        values = seeded_block(rows.to(tl.uint32), ranks.to(tl.uint32), rank, k0, k1, scale, BASIS == 1)  # 1: GAUSSIAN
    return values

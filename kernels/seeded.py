"""Counter-based random projections, regenerated from a shared seed.

Every entry of a projection matrix P (d x r) is a pure function of (key, row, column):
an integer hash of the element's counter turned into a float with exact arithmetic only.
That makes the matrix identical bit for bit on every worker, on every backend: integer
hashing wraps identically everywhere, integer sums below 2**24 convert to float exactly, and
the single float multiply by the scale is correctly rounded IEEE arithmetic.

This module holds the pure-torch reference; a Triton kernel must reproduce it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
Distribution = Literal["gaussian", "rademacher"]
Side = Literal["left", "right"]

# The "gaussian" entries are Irwin-Hall sums of four 16-bit uniforms: mean 0, unit variance,
# sub-Gaussian tails, and computable with integer arithmetic on any backend.
_IRWIN_HALL_OFFSET = 2 * 0xFFFF
_IRWIN_HALL_STD = math.sqrt(4 * (65536.0**2 - 1) / 12)


def mix32(x: int) -> int:
    """The lowbias32 integer hash on a Python int (used to derive keys on the host)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


@dataclass(frozen=True)
class StreamKey:
    """Two 32-bit words naming one random matrix: derived from (job seed, refresh, parameter)."""

    k0: int
    k1: int

    @classmethod
    def derive(cls, seed: int, *ids: int) -> "StreamKey":
        h = mix32(seed & MASK32) ^ mix32((seed >> 32) + GOLDEN32)
        for value in ids:
            h = mix32(h ^ mix32((value + GOLDEN32) & MASK32))
        return cls(k0=h, k1=mix32(h + GOLDEN32))


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 tensors holding uint32 values, with no int64 overflow."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & MASK32


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of uint32 values; the same function as ``mix32``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(counter: torch.Tensor, key: StreamKey) -> torch.Tensor:
    """32 random bits per counter (int64 tensor of values below 2**32)."""
    return mix32_tensor(mix32_tensor(counter ^ key.k0) ^ key.k1)


def projection_scale(reduced_dim: int) -> float:
    """Entries have variance 1/d, so the r columns of P are nearly orthonormal."""
    return 1.0 / math.sqrt(reduced_dim)


def seeded_matrix(
    key: StreamKey,
    rows: int,
    rank: int,
    distribution: Distribution = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The projection matrix P (rows x rank) for ``key``: entry (i, k) uses counter i * rank + k."""
    if rows * rank * 2 >= 2**32:
        raise ValueError(f"a {rows}x{rank} seeded matrix exceeds the 2**32 counter space")
    counter = torch.arange(rows * rank, dtype=torch.int64, device=device)
    scale = torch.tensor(projection_scale(rows), dtype=torch.float32)
    if distribution == "rademacher":
        bits = random_bits(counter, key)
        signs = 1 - 2 * (bits >> 31)
        values = signs.to(torch.float32) * scale
    elif distribution == "gaussian":
        a = random_bits(2 * counter, key)
        b = random_bits(2 * counter + 1, key)
        total = (a & 0xFFFF) + (a >> 16) + (b & 0xFFFF) + (b >> 16) - _IRWIN_HALL_OFFSET
        values = total.to(torch.float32) * torch.tensor(scale.item() / _IRWIN_HALL_STD, dtype=torch.float32)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'rademacher'")
    return values.reshape(rows, rank).to(dtype)


def reduced_dim(shape: torch.Size | tuple[int, int], side: Side) -> int:
    """The dimension a projection on ``side`` removes: rows for 'left', columns for 'right'."""
    return shape[0] if side == "left" else shape[1]


def project(grad: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """R = P^T G (left, r x n) or R = G P (right, m x r), computed in fp32."""
    g = grad.float()
    return basis.t() @ g if side == "left" else g @ basis


def reconstruct(coeffs: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """P R (left) or R P^T (right): the full-size matrix the coefficients stand for."""
    return basis @ coeffs if side == "left" else coeffs @ basis.t()


def seeded_project(
    grad: torch.Tensor, key: StreamKey, rank: int, side: Side, distribution: Distribution = "gaussian"
) -> torch.Tensor:
    """Reference for the fused kernel: project ``grad`` on the seeded basis."""
    basis = seeded_matrix(key, reduced_dim(grad.shape, side), rank, distribution, device=grad.device)
    return project(grad, basis, side)


def seeded_reconstruct_add_(
    out: torch.Tensor,
    coeffs: torch.Tensor,
    key: StreamKey,
    alpha: float,
    side: Side,
    distribution: Distribution = "gaussian",
) -> torch.Tensor:
    """Reference for the fused kernel: out += alpha * P R, in place."""
    rank = coeffs.shape[0] if side == "left" else coeffs.shape[1]
    basis = seeded_matrix(key, reduced_dim(out.shape, side), rank, distribution, device=out.device)
    out.add_(reconstruct(coeffs.float(), basis, side).to(out.dtype), alpha=alpha)
    return out

"""Counter-based random projections, regenerated from a shared seed.

Every entry of a projection matrix P (d x r) is a pure function of (key, row, column):
an integer hash of the element's counter turned into a float with exact arithmetic only.
That makes the matrix identical bit for bit on every worker, on every backend: integer
hashing wraps identically everywhere, integer sums below 2**24 convert to float exactly, and
the single float multiply by the scale is correctly rounded IEEE arithmetic.

This module holds the pure-torch reference and, side by side, the same generator as a Triton
device function (``seeded_block``) that the projection kernels call, plus a Triton kernel that
materialises P (used to check the two agree bit for bit, and by ``seeded_matrix`` on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from disttrain.kernels._triton import jit, tl, triton

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
Distribution = Literal["gaussian", "rademacher"]

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


def check_counter_space(rows: int, rank: int) -> None:
    """Gaussian entries use counters 2c and 2c + 1, which must stay below 2**32."""
    if rows * rank * 2 >= 2**32:
        raise ValueError(f"a {rows}x{rank} seeded matrix exceeds the 2**32 counter space")


def entry_scale(rows: int, distribution: Distribution) -> float:
    """The fp32 factor that turns an entry's integer (a sign, or a centred Irwin-Hall sum) into its value."""
    scale = torch.tensor(projection_scale(rows), dtype=torch.float32)
    if distribution == "rademacher":
        return scale.item()
    if distribution == "gaussian":
        return torch.tensor(scale.item() / _IRWIN_HALL_STD, dtype=torch.float32).item()
    raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'rademacher'")


def seeded_matrix(
    key: StreamKey,
    rows: int,
    rank: int,
    distribution: Distribution = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The projection matrix P (rows x rank) for ``key``: entry (i, k) uses counter i * rank + k."""
    check_counter_space(rows, rank)
    scale = torch.tensor(entry_scale(rows, distribution), dtype=torch.float32)
    counter = torch.arange(rows * rank, dtype=torch.int64, device=device)
    if distribution == "rademacher":
        bits = random_bits(counter, key)
        integers = 1 - 2 * (bits >> 31)
    else:
        a = random_bits(2 * counter, key)
        b = random_bits(2 * counter + 1, key)
        integers = (a & 0xFFFF) + (a >> 16) + (b & 0xFFFF) + (b >> 16) - _IRWIN_HALL_OFFSET
    return (integers.to(torch.float32) * scale).reshape(rows, rank).to(dtype)


# The same generator in Triton, for kernels that build tiles of P in registers. The hashing
# runs in uint32 and wraps exactly like the masked int64 arithmetic above; the keys travel as
# int32 bit patterns. The Irwin-Hall sum of four 16-bit words is below 2**23, so OR-ing it into
# the mantissa of the float 2**23 and subtracting 2**23 gives its exact float without an int to
# float conversion; the one multiply by the scale is the same correctly rounded fp32 multiply.


def kernel_words(key: StreamKey) -> tuple[int, int]:
    """The key's two words as int32 bit patterns, the type a Triton scalar argument gets."""
    return tuple(word - 2**32 if word >= 2**31 else word for word in (key.k0, key.k1))


@jit()
def _mix32_block(x):
    """lowbias32 on a uint32 block."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@jit()
def _random_bits_block(counter, k0, k1):
    """``random_bits`` on a uint32 block, with uint32 keys."""
    return _mix32_block(_mix32_block(counter ^ k0) ^ k1)


@jit()
def seeded_block(rows, cols, rank, k0, k1, scale, GAUSSIAN: tl.constexpr):
    """Entries P[rows, cols] for broadcastable uint32 index blocks: ``seeded_matrix`` bit for bit."""
    counter = rows * rank + cols
    k0 = k0.to(tl.uint32, bitcast=True)
    k1 = k1.to(tl.uint32, bitcast=True)
    if GAUSSIAN:
        a = _random_bits_block(2 * counter, k0, k1)
        b = _random_bits_block(2 * counter + 1, k0, k1)
        total = (a & 0xFFFF) + (a >> 16) + (b & 0xFFFF) + (b >> 16)
        # 8519678.0 = 2**23 + 2 * 0xFFFF: undoes the mantissa trick and centres the sum.
        values = ((total | 0x4B000000).to(tl.float32, bitcast=True) - 8519678.0) * scale
    else:
        bits = _random_bits_block(counter, k0, k1)
        values = tl.where((bits >> 31) == 0, scale, -scale)
    return values


@jit(do_not_specialize=["k0", "k1"])
def _seeded_matrix_kernel(
    out_ptr, rows, rank, k0, k1, scale, GAUSSIAN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_RANK: tl.constexpr
):
    """One BLOCK_ROWS x BLOCK_RANK tile of P, in fp32."""
    offs_i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_k = tl.program_id(1) * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
    values = seeded_block(offs_i[:, None].to(tl.uint32), offs_k[None, :].to(tl.uint32), rank, k0, k1, scale, GAUSSIAN)
    mask = (offs_i[:, None] < rows) & (offs_k[None, :] < rank)
    offsets = offs_i[:, None].to(tl.int64) * rank + offs_k[None, :]
    tl.store(out_ptr + offsets, values, mask=mask)


def seeded_matrix_triton(
    key: StreamKey,
    rows: int,
    rank: int,
    distribution: Distribution = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``seeded_matrix`` generated by a Triton kernel: the same matrix, bit for bit.

    The kernel writes fp32 and torch converts, so other dtypes round exactly as the reference's do.
    """
    check_counter_space(rows, rank)
    scale = entry_scale(rows, distribution)
    out = torch.empty(rows, rank, dtype=torch.float32, device=device)
    block_rows, block_rank = 64, 32
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(rank, block_rank))
    _seeded_matrix_kernel[grid](
        out, rows, rank, *kernel_words(key), scale, distribution == "gaussian", block_rows, block_rank
    )
    return out.to(dtype)

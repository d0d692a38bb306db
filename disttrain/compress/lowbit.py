"""Payloads of 1, 2 or 4 bits per coefficient, one fp32 scale per row, packed into bytes.

Each value is rounded to the nearest of 2**bits evenly spaced levels placed symmetrically
around zero, (q - (2**bits - 1) / 2) * step for q = 0 .. 2**bits - 1, and clipped to the outer
ones. The row's step is its RMS times the step of Max's MSE-optimal uniform quantiser for a
unit Gaussian; at 1 bit that makes every value +-0.80 RMS (a scaled sign). Rounding is
deterministic: under error feedback, what a round drops is sent in later ones.
"""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor
from disttrain.compress.int8 import RowScaledPayload

LOW_BITS = (1, 2, 4)
# Max (1960), "Quantizing for minimum distortion": optimal uniform step for N(0, 1) at 2, 4, 16 levels.
_GAUSSIAN_STEP = {1: 1.596, 2: 0.9957, 4: 0.3352}


def quantize_rows_lowbit(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, 2**bits) as uint8, one step per row) for a 2-D float tensor."""
    rows = rows.float()
    levels = 1 << bits
    steps = rows.pow(2).mean(dim=1).sqrt() * _GAUSSIAN_STEP[bits]  # 0 for an all-zero row, which decodes to zeros
    divisors = torch.where(steps > 0, steps, torch.ones_like(steps))
    codes = torch.floor(rows / divisors[:, None] + levels / 2).clamp_(0, levels - 1)
    return codes.to(torch.uint8), steps


def dequantize_rows_lowbit(codes: torch.Tensor, steps: torch.Tensor, bits: int) -> torch.Tensor:
    """The level each code stands for, row by row."""
    return (codes.float() - ((1 << bits) - 1) / 2) * steps[:, None]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes of ``bits`` bits each, 8 // bits to a byte (the last byte zero-padded)."""
    per_byte = 8 // bits
    flat = codes.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // per_byte) * per_byte, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=flat.device) * bits
    return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a packed byte tensor."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


class LowBitPayload(RowScaledPayload):
    """Codes of ``bits`` bits per coefficient, packed into bytes, one step per row."""

    def __init__(self, inner: Compressor, bits: int):
        if bits not in LOW_BITS:
            raise ValueError(f"bits must be one of {LOW_BITS}, got {bits}")
        super().__init__(inner)
        self.bits = bits

    def code_bytes(self) -> int:
        return -(-self.inner.coeff_numel() * self.bits // 8)

    def quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, steps = quantize_rows_lowbit(rows, self.bits)
        return pack_codes(codes, self.bits), steps

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        unpacked = unpack_codes(codes, self.bits, self.inner.coeff_numel()).reshape(self.rows, -1)
        return dequantize_rows_lowbit(unpacked, scales, self.bits)

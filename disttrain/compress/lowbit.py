"""Payloads of 1, 2 or 4 bits per coefficient, one fp32 scale per row, packed into bytes.

Each value is rounded to the nearest of 2**bits evenly spaced levels placed symmetrically
around zero, (q - (2**bits - 1) / 2) * step for q = 0 .. 2**bits - 1, and clipped to the outer
ones. The row's step is its RMS times the step of Max's MSE-optimal uniform quantiser for a
unit Gaussian; at 1 bit that makes every value +-0.80 RMS (a scaled sign). Rounding is
deterministic: under error feedback, what a round drops is sent in later ones.
"""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor, CompressorWrapper

LOW_BITS = (1, 2, 4)
# Max (1960), "Quantizing for minimum distortion": optimal uniform step for N(0, 1) at 2, 4, 16 levels.
_GAUSSIAN_STEP = {1: 1.596, 2: 0.9957, 4: 0.3352}
_SCALE_BYTES = 4


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


class LowBitPayload(CompressorWrapper):
    """Wraps a summable compressor and sends its coefficients at ``bits`` bits each.

    Wire layout (uint8): the row steps as fp32 bytes, then the packed codes. Payloads are not
    summable, so the communication layer all_gathers them and decodes each one.
    """

    def __init__(self, inner: Compressor, bits: int):
        if bits not in LOW_BITS:
            raise ValueError(f"bits must be one of {LOW_BITS}, got {bits}")
        if not inner.summable or len(inner.coeff_shape) == 0:
            raise ValueError("LowBitPayload wraps a summable compressor with at least 1-D coefficients")
        super().__init__(inner)
        self.summable = False
        self.bits = bits
        self.rows = inner.coeff_shape[0]

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.uint8

    def wire_numel(self) -> int:
        return self.rows * _SCALE_BYTES + -(-self.inner.coeff_numel() * self.bits // 8)

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        coeffs = self.inner.decode(self.inner.encode(grad)).reshape(self.rows, -1)
        codes, steps = quantize_rows_lowbit(coeffs, self.bits)
        return torch.cat([steps.view(torch.uint8), pack_codes(codes, self.bits)])

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        split = self.rows * _SCALE_BYTES
        steps = wire[:split].clone().view(torch.float32)
        codes = unpack_codes(wire[split:], self.bits, self.inner.coeff_numel()).reshape(self.rows, -1)
        return dequantize_rows_lowbit(codes, steps, self.bits).reshape(self.coeff_shape)

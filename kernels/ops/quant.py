"""Symmetric int8 with one fp32 scale per row: the quantiser of the int8 wire payload.

scale = max|row| / 127 and value = round-half-even(x / scale) clamped to [-127, 127]; an
all-zero row gets scale 0 and zeros. The Triton kernels give the references' bits exactly: the
max is exact, both divisions are correctly rounded (div_rn), and adding then subtracting
1.5 * 2**23 rounds half to even exactly for |x| <= 127.

Not fused into the projection kernel: a row's scale needs the whole row of R, which a split
projection only has once every split has added in, so quantising inside it would need a
grid-wide barrier. R (rank x n) is rank/m of the gradient's size, so this separate pass costs
about that fraction of the projection; ``benchmarks/kernels.py`` measures it.
"""

from __future__ import annotations

import torch

from disttrain.kernels._triton import autotune, jit, tl, triton

_ROUNDING_MAGIC = 1.5 * 2**23


def quantize_rows_torch(coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row: returns (int8 values, fp32 scales)."""
    rows = coeffs.float().reshape(coeffs.shape[0], -1)
    scales = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return values, scales


def dequantize_rows_torch(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 rows back from int8 values (rows x cols) and their scales."""
    return values.float() * scales[:, None]


_CONFIGS = [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 4096, "num_warps": 8}]
_INTERPRETER_CONFIG = {"BLOCK": 32, "num_warps": 1}


@autotune(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=["cols"])
@jit()
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, cols, stride_row, stride_col, MAGIC: tl.constexpr, BLOCK: tl.constexpr):
    """One row: its max magnitude, then its int8 values."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + offs * stride_col, mask=offs < cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.div_rn(tl.max(amax, axis=0), 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + offs * stride_col, mask=offs < cols, other=0.0)
        q = (tl.div_rn(x.to(tl.float32), tl.broadcast_to(safe, (BLOCK,))) + MAGIC) - MAGIC
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * cols + offs, q.to(tl.int8), mask=offs < cols)
    tl.store(scale_ptr + row, scale)


@autotune(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=["numel"])
@jit()
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, numel, cols, BLOCK: tl.constexpr):
    """BLOCK consecutive values of the flattened rows."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    q = tl.load(q_ptr + offs, mask=mask, other=0)
    scale = tl.load(scale_ptr + offs // cols, mask=mask, other=0.0)
    tl.store(out_ptr + offs, q.to(tl.float32) * scale, mask=mask)


def quantize_rows_triton(coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_torch`` as one Triton kernel, one program per row: the same bits."""
    x = coeffs.reshape(coeffs.shape[0], -1)
    values = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _quantize_kernel[(x.shape[0],)](x, values, scales, x.shape[1], *x.stride(), MAGIC=_ROUNDING_MAGIC)
    return values, scales


def dequantize_rows_triton(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``dequantize_rows_torch`` as one Triton kernel: the same bits."""
    q = values.contiguous()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(q.numel(), meta["BLOCK"]),)

    _dequantize_kernel[grid](q, scales, out, q.numel(), q.shape[1])
    return out

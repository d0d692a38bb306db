"""Projection R = P^T (G + e) (left) or (G + e) P (right), with the optional residual fused in.

The Triton kernel works on the oriented view (the projected dimension first, as a strided
view, so 'right' costs no transpose copy): each program owns a BLOCK_R x BLOCK_L tile of R
and walks down its share of the D rows, loading G (and e) once and building the matching
tile of P in registers (seeded) or loading it (stored). When there are too few tiles to fill
the GPU, the D rows are split across programs whose partial sums meet in fp32 atomic adds;
under ``torch.use_deterministic_algorithms(True)`` there is no split and no atomic, so the
result is the same bits on every run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from disttrain.kernels._triton import autotune, jit, tl, triton
from disttrain.kernels.basis import (
    Basis,
    SeededMatrix,
    Side,
    basis_block,
    basis_shape,
    check_rows,
    check_same_shape,
    dense,
    operands,
    oriented,
)
from disttrain.kernels.precision import dot_acc, dot_dtype
from disttrain.kernels.seeded import seeded_matrix_triton

# A tile of R should not hold more than this many fp32 accumulators per thread of its program.
_ACCUMULATORS_PER_THREAD = 64
_NOMINAL_SMS = 4  # off CUDA (the interpreter): small, so that tests exercise the split path


def corrected(grad: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """G + e in fp32 (G alone without a residual)."""
    return grad.float() if residual is None else grad.float() + residual


def project_torch(grad: torch.Tensor, basis: Basis, side: Side, residual: torch.Tensor | None = None) -> torch.Tensor:
    """R = P^T (G + e) for 'left' (rank x n) or (G + e) P for 'right' (m x rank), in fp32."""
    check_rows(basis, oriented(grad, side).shape[0], "the gradient")
    check_same_shape(residual, grad, "the residual")
    p = dense(basis, grad.device)
    target = corrected(grad, residual)
    return p.t() @ target if side == "left" else target @ p


def _rank_block(rank: int) -> int:
    """The smallest power-of-two block (16 to 128) that holds the rank."""
    return min(max(16, triton.next_power_of_2(rank)), 128)


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Rank blocks of the rank's size or half of it, with accumulators that fit in registers.

    Every program regenerates its BLOCK_R x BLOCK_D tile of P for each BLOCK_D x BLOCK_L tile of
    G, so a wider BLOCK_L spreads the hashing over more data; a narrower BLOCK_R makes room for
    it, at the price of reading G once per rank block (mostly from L2).
    """
    largest = _rank_block(named_args["R"])
    return [
        config
        for config in configs
        if largest // 2 <= config.kwargs["BLOCK_R"] <= largest
        and config.kwargs["BLOCK_R"] * config.kwargs["BLOCK_L"] <= _ACCUMULATORS_PER_THREAD * 32 * config.num_warps
    ]


_CONFIGS = [
    {"BLOCK_D": block_d, "BLOCK_L": block_l, "BLOCK_R": block_r, "num_warps": warps, "num_stages": 3}
    for block_d, block_l, warps in [(64, 64, 4), (64, 128, 8), (32, 256, 8)]
    for block_r in (16, 32, 64, 128)
]


@autotune(
    configs=_CONFIGS,
    interpreter_config={"BLOCK_D": 16, "BLOCK_L": 16, "BLOCK_R": 16, "num_warps": 1},
    key=["D", "L", "R", "BASIS", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["out_ptr"],
)
@jit(do_not_specialize=["k0", "k1"])
def _project_kernel(
    g_ptr, e_ptr, p_ptr, out_ptr, D, L, R,
    stride_gd, stride_gl, stride_ed, stride_el, stride_pd, stride_pr, stride_or, stride_ol,
    k0, k1, scale,
    BASIS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One BLOCK_R x BLOCK_L tile of R from one split of the D rows (added atomically when split)."""
    tiles_r = tl.cdiv(R, BLOCK_R)
    offs_r = (tl.program_id(0) % tiles_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = (tl.program_id(0) // tiles_r) * BLOCK_L + tl.arange(0, BLOCK_L)
    splits = tl.num_programs(1)
    # Each split walks the same number of whole BLOCK_D steps; the last one may run past D (masked).
    chunk = tl.cdiv(tl.cdiv(D, splits), BLOCK_D) * BLOCK_D
    start = tl.program_id(1) * chunk
    acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for step in range(0, chunk, BLOCK_D):
        offs_d = start + step + tl.arange(0, BLOCK_D)
        mask = (offs_d[:, None] < D) & (offs_l[None, :] < L)
        rows = offs_d[:, None].to(tl.int64)
        g = tl.load(g_ptr + rows * stride_gd + offs_l[None, :] * stride_gl, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            e = tl.load(e_ptr + rows * stride_ed + offs_l[None, :] * stride_el, mask=mask, other=0.0)
            g = g.to(tl.float32) + e.to(tl.float32)
        p_t = basis_block(p_ptr, stride_pd, stride_pr, offs_d[None, :], offs_r[:, None], D, R, k0, k1, scale, BASIS)
        acc = dot_acc(p_t, g, acc, DOT_DTYPE)
    out = out_ptr + offs_r[:, None] * stride_or + offs_l[None, :] * stride_ol
    out_mask = (offs_r[:, None] < R) & (offs_l[None, :] < L)
    if splits == 1:
        tl.store(out, acc, mask=out_mask)
    else:
        tl.atomic_add(out, acc, mask=out_mask, sem="relaxed")


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a nominal few off CUDA)."""
    if device.type != "cuda":
        return _NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(meta: dict[str, Any], tiles: int, device: torch.device) -> int:
    """How many programs share each tile's D rows: enough to fill the GPU twice over, but each
    split keeps at least four BLOCK_D chunks and 8 * rank rows, so atomics stay a small cost."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    wanted = triton.cdiv(2 * _sm_count(device), tiles)
    most = meta["D"] // max(8 * meta["R"], 4 * meta["BLOCK_D"])
    return max(1, min(wanted, most))


def project_triton(grad: torch.Tensor, basis: Basis, side: Side, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``project_torch`` in Triton: G and e are read once. A seeded P of 16-bit data is generated once
    into a transient fp32 buffer (R/L of G's size) and read as a stored one, the same bits as making it
    in registers: there the tile products run at full tensor-core rate and regenerating P's tiles for
    every tile of G would dominate (benchmarks/kernels.py measures both). Otherwise P never exists."""
    if isinstance(basis, SeededMatrix) and grad.dtype in (torch.bfloat16, torch.float16):
        basis = seeded_matrix_triton(basis.key, basis.rows, basis.rank, basis.distribution, device=grad.device)
    return project_in_registers_triton(grad, basis, side, residual)


def project_in_registers_triton(
    grad: torch.Tensor, basis: Basis, side: Side, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``project_torch`` as one fused Triton kernel: G and e are read once, a seeded P is made tile by tile in registers."""
    g = oriented(grad, side)
    check_rows(basis, g.shape[0], "the gradient")
    check_same_shape(residual, grad, "the residual")
    e = g if residual is None else oriented(residual, side)
    p = operands(basis, g)
    rank, length = basis_shape(basis)[1], g.shape[1]
    result = torch.zeros((rank, length) if side == "left" else (length, rank), dtype=torch.float32, device=g.device)
    out = oriented(result, side)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        tiles = triton.cdiv(length, meta["BLOCK_L"]) * triton.cdiv(rank, meta["BLOCK_R"])
        return tiles, _splits(meta, tiles, g.device)

    _project_kernel[grid](
        g, e, p.tensor, out, g.shape[0], length, rank,
        *g.stride(), *e.stride(), p.stride_row, p.stride_rank, *out.stride(),
        p.k0, p.k1, p.scale,
        BASIS=p.code,
        HAS_RESIDUAL=residual is not None,
        DOT_DTYPE=dot_dtype(grad.dtype if residual is None else torch.float32),
    )
    return result

"""Reconstruction out = A + e + alpha * P R in one pass: P R is never stored, a seeded P never exists.

One kernel serves three uses: ``reconstruct`` (P R into a new tensor), ``reconstruct_add_``
(out += alpha P R in place: decoding an averaged gradient, or applying an update), and
``feedback_residual`` ((G + e) - P R, error feedback's next residual: G and e are read once and
the residual written once). Like the projection it works on the oriented view, one program per
BLOCK_D x BLOCK_L output tile, walking the rank in BLOCK_R steps with P's tile made in registers.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain.kernels._triton import autotune, jit, tl, triton
from disttrain.kernels.basis import (
    Basis,
    Side,
    basis_block,
    basis_shape,
    check_rows,
    check_same_shape,
    check_side,
    dense,
    operands,
    oriented,
)
from disttrain.kernels.precision import dot_acc, dot_dtype
from disttrain.kernels.projection import corrected


def reconstruct_torch(coeffs: torch.Tensor, basis: Basis, side: Side) -> torch.Tensor:
    """P R (left) or R P^T (right) in fp32: the full-size matrix the coefficients stand for."""
    check_side(side)
    p = dense(basis, coeffs.device)
    c = coeffs.float()
    return p @ c if side == "left" else c @ p.t()


def reconstruct_add_torch(
    out: torch.Tensor, coeffs: torch.Tensor, basis: Basis, alpha: float, side: Side
) -> torch.Tensor:
    """out += alpha * P R, in place (P R computed in fp32, then rounded to out's dtype)."""
    out.add_(reconstruct_torch(coeffs, basis, side).to(out.dtype), alpha=alpha)
    return out


def feedback_residual_torch(
    grad: torch.Tensor, residual: torch.Tensor | None, coeffs: torch.Tensor, basis: Basis, side: Side
) -> torch.Tensor:
    """(G + e) - P R in fp32: what error feedback carries to the next step."""
    check_same_shape(residual, grad, "the residual")
    return corrected(grad, residual) - reconstruct_torch(coeffs, basis, side)


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Rank steps of 16 for ranks up to 16, else 32: a step's tile of P is made whole even past the rank."""
    step = 16 if named_args["R"] <= 16 else 32
    return [config for config in configs if config.kwargs["BLOCK_R"] == step]


_CONFIGS = [
    {"BLOCK_D": block_d, "BLOCK_L": block_l, "BLOCK_R": block_r, "num_warps": warps, "num_stages": 3}
    for block_d, block_l, warps in [(64, 128, 4), (128, 128, 8), (64, 256, 8)]
    for block_r in (16, 32)
]


@autotune(
    configs=_CONFIGS,
    interpreter_config={"BLOCK_D": 16, "BLOCK_L": 16, "BLOCK_R": 16, "num_warps": 1},
    key=["D", "L", "R", "BASIS", "HAS_ADDEND", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
)
@jit(do_not_specialize=["k0", "k1"])
def _reconstruct_kernel(
    c_ptr, p_ptr, a_ptr, e_ptr, out_ptr, D, L, R,
    stride_cr, stride_cl, stride_pd, stride_pr, stride_ad, stride_al, stride_ed, stride_el, stride_od, stride_ol,
    alpha, k0, k1, scale,
    BASIS: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One BLOCK_D x BLOCK_L tile of out = A + e + alpha * P R."""
    tiles_l = tl.cdiv(L, BLOCK_L)
    offs_d = (tl.program_id(0) // tiles_l) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = (tl.program_id(0) % tiles_l) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for r in range(0, R, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        p = basis_block(p_ptr, stride_pd, stride_pr, offs_d[:, None], offs_r[None, :], D, R, k0, k1, scale, BASIS)
        c_mask = (offs_r[:, None] < R) & (offs_l[None, :] < L)
        c = tl.load(c_ptr + offs_r[:, None] * stride_cr + offs_l[None, :] * stride_cl, mask=c_mask, other=0.0)
        acc = dot_acc(p, c, acc, DOT_DTYPE)
    rows = offs_d[:, None].to(tl.int64)
    mask = (offs_d[:, None] < D) & (offs_l[None, :] < L)
    result = alpha * acc
    if HAS_ADDEND:
        result += tl.load(a_ptr + rows * stride_ad + offs_l[None, :] * stride_al, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        result += tl.load(e_ptr + rows * stride_ed + offs_l[None, :] * stride_el, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + rows * stride_od + offs_l[None, :] * stride_ol
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    out: torch.Tensor,
    coeffs: torch.Tensor,
    basis: Basis,
    side: Side,
    alpha: float,
    addend: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = addend + residual + alpha * P R (absent terms left out); returns ``out``."""
    o = oriented(out, side)
    c = oriented(coeffs, side)
    check_rows(basis, o.shape[0], "the output")
    if c.shape != (basis_shape(basis)[1], o.shape[1]):
        raise ValueError(f"coefficients of shape {tuple(coeffs.shape)} do not fit a {side} reconstruction of shape "
                         f"{tuple(out.shape)} with rank {basis_shape(basis)[1]}")
    check_same_shape(residual, out, "the residual")
    a = o if addend is None else oriented(addend, side)
    e = o if residual is None else oriented(residual, side)
    p = operands(basis, o)
    rows, length = o.shape

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(rows, meta["BLOCK_D"]) * triton.cdiv(length, meta["BLOCK_L"]),)

    _reconstruct_kernel[grid](
        c, p.tensor, a, e, o, rows, length, c.shape[0],
        *c.stride(), p.stride_row, p.stride_rank, *a.stride(), *e.stride(), *o.stride(),
        alpha, p.k0, p.k1, p.scale,
        BASIS=p.code,
        HAS_ADDEND=addend is not None,
        HAS_RESIDUAL=residual is not None,
        DOT_DTYPE=dot_dtype(out.dtype),
    )
    return out


def _full_shape(coeffs: torch.Tensor, basis: Basis, side: Side) -> tuple[int, int]:
    """The shape P R (left) or R P^T (right) has."""
    rows = basis_shape(basis)[0]
    return (rows, coeffs.shape[1]) if side == "left" else (coeffs.shape[0], rows)


def reconstruct_triton(coeffs: torch.Tensor, basis: Basis, side: Side) -> torch.Tensor:
    """``reconstruct_torch`` as one Triton kernel."""
    out = torch.empty(_full_shape(coeffs, basis, side), dtype=torch.float32, device=coeffs.device)
    return _launch(out, coeffs, basis, side, 1.0)


def reconstruct_add_triton(
    out: torch.Tensor, coeffs: torch.Tensor, basis: Basis, alpha: float, side: Side
) -> torch.Tensor:
    """``reconstruct_add_torch`` as one Triton kernel: out is read and written once."""
    return _launch(out, coeffs, basis, side, alpha, addend=out)


def feedback_residual_triton(
    grad: torch.Tensor, residual: torch.Tensor | None, coeffs: torch.Tensor, basis: Basis, side: Side
) -> torch.Tensor:
    """``feedback_residual_torch`` as one Triton kernel: reads G and e once, writes the residual once."""
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    return _launch(out, coeffs, basis, side, -1.0, addend=grad, residual=residual)

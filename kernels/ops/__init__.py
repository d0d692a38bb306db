"""Projection and reconstruction on the device, with pure-torch references side by side.

Every function here runs a Triton kernel when its data is on a CUDA device (and triton is
installed) and the torch reference otherwise; ``backend(...)`` or DISTTRAIN_KERNELS override
the choice (see ``dispatch``). One module per operation, kernel and reference together:

- ``seeded``: the counter-based generator of seeded matrices, bit for bit the same in both;
- ``basis``: a basis as kernels read it, a stored P or a ``SeededMatrix`` made in registers;
- ``projection``: R = P^T (G + e), the residual e optional;
- ``reconstruction``: A + e + alpha P R, behind reconstruct, reconstruct_add_ and feedback_residual;
- ``quant``: int8 with one scale per row;
- ``votes``: the default method's chunked top-k votes of a momentum, and the mean of every worker's votes.
"""

from __future__ import annotations

import torch

from disttrain.kernels import projection as _project
from disttrain.kernels import quant as _quant
from disttrain.kernels import reconstruction as _reconstruct
from disttrain.kernels import seeded as _seeded
from disttrain.kernels import votes as _votes
from disttrain.kernels.basis import Basis, SeededMatrix, Side, reduced_dim
from disttrain.kernels.dispatch import backend, dispatched
from disttrain.kernels.seeded import Distribution, StreamKey

seeded_matrix = dispatched(_seeded.seeded_matrix, _seeded.seeded_matrix_triton)
project = dispatched(_project.project_torch, _project.project_triton)
reconstruct = dispatched(_reconstruct.reconstruct_torch, _reconstruct.reconstruct_triton)
reconstruct_add_ = dispatched(_reconstruct.reconstruct_add_torch, _reconstruct.reconstruct_add_triton)
feedback_residual = dispatched(_reconstruct.feedback_residual_torch, _reconstruct.feedback_residual_triton)
quantize_rows = dispatched(_quant.quantize_rows_torch, _quant.quantize_rows_triton)
dequantize_rows = dispatched(_quant.dequantize_rows_torch, _quant.dequantize_rows_triton)
top_votes = dispatched(_votes.top_votes_torch, _votes.top_votes_triton)
vote_mean = dispatched(_votes.vote_mean_torch, _votes.vote_mean_triton)


def seeded_project(
    grad: torch.Tensor,
    key: StreamKey,
    rank: int,
    side: Side,
    distribution: Distribution = "gaussian",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = P^T (G + e) (left) or (G + e) P (right) for the seeded P of ``key``, which is never stored."""
    return project(grad, SeededMatrix(key, reduced_dim(grad.shape, side), rank, distribution), side, residual)


def seeded_reconstruct_add_(
    out: torch.Tensor,
    coeffs: torch.Tensor,
    key: StreamKey,
    alpha: float,
    side: Side,
    distribution: Distribution = "gaussian",
) -> torch.Tensor:
    """out += alpha * P R (left) or alpha * R P^T (right) in place, for the seeded P of ``key``."""
    rank = coeffs.shape[0] if side == "left" else coeffs.shape[1]
    basis = SeededMatrix(key, reduced_dim(out.shape, side), rank, distribution)
    return reconstruct_add_(out, coeffs, basis, alpha, side)


__all__ = [
    "Basis",
    "Distribution",
    "SeededMatrix",
    "Side",
    "StreamKey",
    "backend",
    "dequantize_rows",
    "feedback_residual",
    "project",
    "quantize_rows",
    "reconstruct",
    "reconstruct_add_",
    "reduced_dim",
    "seeded_matrix",
    "seeded_project",
    "seeded_reconstruct_add_",
    "top_votes",
    "vote_mean",
]

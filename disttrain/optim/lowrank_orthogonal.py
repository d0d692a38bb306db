"""Orthogonalised low-rank updates (Muon / Dion style) instead of per-coordinate Adam.

For a projected weight the averaged coefficients C (r x L) and the basis F (d x r) give the
reconstruction F C. Its orthogonalised form F U V^T (C = U S V^T) keeps the directions and drops
the magnitudes, as Muon does for a whole matrix; scaled to an RMS of 0.2 per entry, like an
AdamW update, so learning rates compare. Nothing is normalised per coordinate, so the noise of a
low-rank reconstruction is not amplified. Momentum lives in the compressor's error feedback
(``feedback_momentum``, as in Dion). Weights that travel dense get plain AdamW.
"""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor
from disttrain.optim.projected_adamw import ProjectedAdamW

ADAMW_UPDATE_RMS = 0.2  # the RMS of a typical AdamW update entry (Moonlight's matching rule)


def orthogonalise(coeffs: torch.Tensor) -> torch.Tensor:
    """U V^T of the thin SVD of ``coeffs``, leaving out directions with no singular value."""
    u, s, vh = torch.linalg.svd(coeffs.float(), full_matrices=False)
    kept = (s > s.max() * 1e-6).to(u.dtype) if s.numel() and s.max() > 0 else torch.zeros_like(s)
    return (u * kept) @ vh


class LowRankOrthogonal(ProjectedAdamW):
    """Projected weights move by lr * F U V^T (scaled to AdamW's RMS); the rest by AdamW."""

    def _projected_step(self, p: torch.nn.Parameter, coeffs: torch.Tensor, compressor: Compressor, group: dict) -> None:
        direction = compressor.reconstruct(orthogonalise(coeffs))
        rank = coeffs.shape[0]
        scale = ADAMW_UPDATE_RMS * (direction.numel() / rank) ** 0.5
        p.add_(direction.to(p.dtype), alpha=-group["lr"] * scale)

"""Local steps inside the round's shared subspace (federated GaLore / frozen-A LoRA).

With a seeded basis P per projected weight, refreshed every round, a worker's local optimizer
reads P^T G of its own gradients and moves the weight by P times its update: every local step
stays in span(P), so the round's pseudo-gradient is P U; an exchange that projects on the same P
sends U almost exactly (P^T P is close to the identity) instead of the 1% of a full update that a
rank-r projection keeps, and any other exchange (sparse votes, say) sends P U its own way. This is
LoRA with the A matrix frozen at a fresh random draw each round, and it costs no bytes to agree on A.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from disttrain.compress.base import Compressor
from disttrain.compress.factory import CompressionSpec, build_compressor


class LocalSubspace:
    """A ProjectedAdamW coefficient source: this worker's own gradients in the round's bases."""

    def __init__(self, params: Sequence[torch.nn.Parameter], spec: CompressionSpec, seed: int):
        if spec.basis != "seeded":
            raise ValueError(
                f"local steps in a subspace need a seeded basis (every worker draws it for free), not {spec.basis!r}"
            )
        plain = replace(spec, payload="fp32", error_feedback=False)
        # Parameter ids as CompressedAllReduce numbers them, so that an exchange on this spec draws the same P.
        self._projected: dict[int, tuple[torch.nn.Parameter, Compressor]] = {
            id(p): (p, build_compressor(plain, p.shape, index, seed))
            for index, p in enumerate(params)
            if plain.compresses(p.shape)
        }
        self.refresh_every = spec.refresh_every

    def begin_round(self, round_index: int) -> list[torch.nn.Parameter]:
        """Draw the bases of round ``round_index`` (an exchange on the same spec draws the same);
        returns the parameters whose basis differs from the previous round's."""
        for _, compressor in self._projected.values():
            compressor.begin_step(round_index)
        return [p for p, _ in self._projected.values()] if round_index % self.refresh_every == 0 else []

    def coefficients(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, Compressor] | None:
        entry = self._projected.get(id(param))
        if entry is None or param.grad is None:
            return None
        compressor = entry[1]
        return compressor.decode(compressor.encode(param.grad)), compressor

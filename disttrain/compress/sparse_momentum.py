"""Compress the momentum, not the gradient (DeMo-style): send where the local momentum is largest.

Each worker keeps its own momentum m <- decay * m + g. Every step it cuts m into chunks of 256
values, picks the ``per_chunk`` largest |m| in each, sends their positions (one byte each) and
signs (two bits each: +, - or an exact 0), and removes them from m; what it did not send stays
in m for later steps, so m is the momentum and the error feedback at once. A receiver turns
every worker's payload into votes of +-1 at the sent positions; the mean of the votes is the
update direction (plain SGD applies it, so a step moves a weight by at most the lr).
At 4 of 256 values per chunk a worker sends 5 bytes where fp32 would send 1024.
"""

from __future__ import annotations

import torch

from disttrain import kernels
from disttrain.compress.base import check_gradient
from disttrain.compress.lowbit import pack_codes, unpack_codes
from disttrain.compress.votes import VoteCompressor

CHUNK = 256  # positions within a chunk fit one byte


class SparseMomentum(VoteCompressor):
    """Top-``per_chunk`` entries of the local momentum per chunk, sent as (position, sign) votes."""

    def __init__(self, shape: torch.Size, per_chunk: int, decay: float, momentum_dtype: torch.dtype = torch.float32):
        if per_chunk < 1:
            raise ValueError(f"per_chunk must be >= 1, got {per_chunk}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"momentum decay must be in [0, 1], got {decay}")
        super().__init__(shape, momentum_dtype)
        numel = self.shape.numel()
        self.chunk = min(CHUNK, numel)
        self.chunks = -(-numel // self.chunk)
        self.per_chunk = min(per_chunk, self.chunk)
        self.decay = decay

    def _picks(self) -> int:
        return self.chunks * self.per_chunk

    def wire_numel(self) -> int:
        return self._picks() + -(-self._picks() // 4)

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        check_gradient(grad, self.shape)
        positions, codes, self._pending = kernels.top_votes(grad, self.momentum, self.decay, self.chunk, self.per_chunk)
        return torch.cat([positions.reshape(-1), pack_codes(codes, 2)])

    def votes(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One payload's (positions, votes of -1, 0 or +1), one row per chunk."""
        positions = wire[: self._picks()].long().view(self.chunks, self.per_chunk)
        signs = unpack_codes(wire[self._picks() :], 2, self._picks()).view(self.chunks, self.per_chunk)
        return positions, signs.float() - 1

    def scatter(self, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A full-size tensor holding ``values`` at chunk ``positions`` (rows: chunks) and zeros elsewhere;
        positions past a short chunk's end are dropped."""
        dense = torch.zeros(self.chunks, CHUNK, device=values.device)
        dense.scatter_(1, positions, values)
        return dense[:, : self.chunk].reshape(-1)[: self.shape.numel()].reshape(self.shape)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        return self.mean_of_payloads(wire.view(1, -1), 1)

    def mean_of_payloads(self, payloads: torch.Tensor, divisor: int) -> torch.Tensor:
        """The mean of every worker's votes in one pass over the wire (``kernels.vote_mean``)."""
        picks, workers = self._picks(), payloads.shape[0]
        packed = payloads[:, picks:]
        codes = unpack_codes(packed.reshape(-1), 2, packed.numel() * 4).view(workers, -1)[:, :picks]
        rows = (workers, self.chunks, self.per_chunk)
        positions, codes = payloads[:, :picks].reshape(rows), codes.reshape(rows)
        return kernels.vote_mean(positions, codes, self.chunk, self.shape.numel(), divisor).reshape(self.shape)

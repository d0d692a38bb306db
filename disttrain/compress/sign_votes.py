"""Lion's sign, voted on a rotating share of the coordinates: one bit per sent value, no positions.

Each worker keeps its own Lion momentum m. Every step it forms c = beta1 * m + (1 - beta1) * g
and sends the sign of c at every ``every``-th coordinate, then updates m <- beta2 * m +
(1 - beta2) * g everywhere. Which coordinates go out is a shared-seed schedule, not data: at a
step, the coordinates i with i % every == phase, and the phases of each cycle of ``every`` steps
are a seeded permutation, so every coordinate is voted once per cycle and no positions travel.
Receivers average the +-1 votes; SGD applies the mean, so a voted weight moves by at most the lr.
At every=5 a worker sends one bit per five values: 160x fewer bytes than fp32.
"""

from __future__ import annotations

import torch

from disttrain.compress.base import check_gradient
from disttrain.compress.lowbit import pack_codes, unpack_codes
from disttrain.compress.votes import VoteCompressor
from disttrain.kernels.seeded import StreamKey, mix32


class SignVotes(VoteCompressor):
    """Sign of the local Lion interpolation at a seeded, rotating 1-in-``every`` share of coordinates."""

    def __init__(
        self, shape: torch.Size, every: int, beta1: float, beta2: float, seed: int, param_id: int,
        momentum_dtype: torch.dtype = torch.float32,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1 (one coordinate in `every` is voted per step), got {every}")
        if not (0.0 <= beta1 <= 1.0 and 0.0 <= beta2 <= 1.0):
            raise ValueError(f"Lion betas must lie in [0, 1], got beta1={beta1}, beta2={beta2}")
        super().__init__(shape, momentum_dtype)
        self.numel = self.shape.numel()
        self.every = min(every, self.numel)
        self.beta1, self.beta2 = beta1, beta2
        self.seed, self.param_id = seed, param_id
        self.phase = 0

    def _votes(self) -> int:
        """Voted coordinates per step (the phase with the most; shorter phases pad the last bit)."""
        return -(-self.numel // self.every)

    def wire_numel(self) -> int:
        return -(-self._votes() // 8)

    def begin_step(self, step: int) -> None:
        cycle, position = divmod(step, self.every)
        key = StreamKey.derive(self.seed, cycle, self.param_id)
        order = sorted(range(self.every), key=lambda phase: mix32(key.k0 ^ mix32(phase + key.k1)))
        self.phase = order[position]

    def _positions(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.phase, self.numel, self.every, device=device)

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        check_gradient(grad, self.shape)
        grad = grad.detach().float().reshape(-1)
        momentum = self.momentum_or_zeros(grad)
        positions = self._positions(grad.device)
        blend = self.beta1 * momentum[positions] + (1 - self.beta1) * grad[positions]
        # An exact zero (no gradient yet) votes + and - on alternate coordinates, not + everywhere.
        plus = (blend > 0) | ((blend == 0) & (positions % 2 == 0))
        codes = torch.zeros(self._votes(), dtype=torch.uint8, device=grad.device)
        codes[: positions.numel()] = plus.to(torch.uint8)
        self._pending = self.beta2 * momentum + (1 - self.beta2) * grad
        return pack_codes(codes, 1)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        positions = self._positions(wire.device)
        bits = unpack_codes(wire, 1, self._votes())[: positions.numel()]
        votes = torch.zeros(self.numel, device=wire.device)
        votes[positions] = bits.float() * 2 - 1
        return votes.reshape(self.shape)

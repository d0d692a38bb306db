"""The identity compressor, for 1-D and small parameters that go over the wire uncompressed."""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor, check_gradient


class DenseCompressor(Compressor):
    """Sends the gradient itself as fp32 (or bf16)."""

    def __init__(self, shape: torch.Size, wire_dtype: torch.dtype = torch.float32):
        self.shape = torch.Size(shape)
        self._wire_dtype = wire_dtype

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    @property
    def wire_dtype(self) -> torch.dtype:
        return self._wire_dtype

    def wire_numel(self) -> int:
        return self.shape.numel()

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        check_gradient(grad, self.shape)
        return grad.detach().reshape(-1).to(self._wire_dtype)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        return wire.float().reshape(self.shape)

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return coeffs.reshape(self.shape)

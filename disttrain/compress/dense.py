"""The identity compressor, for 1-D and small parameters that go over the wire uncompressed."""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor, check_gradient


class DenseCompressor(Compressor):
    """Sends the gradient itself as fp32 (or bf16). With ``rows``, its coefficients are the
    gradient viewed as ``rows`` rows (what an int8 payload gives one scale each)."""

    def __init__(self, shape: torch.Size, wire_dtype: torch.dtype = torch.float32, rows: int | None = None):
        self.shape = torch.Size(shape)
        self._wire_dtype = wire_dtype
        if rows is not None and (rows < 1 or self.shape.numel() % rows):
            raise ValueError(f"cannot view a gradient of shape {tuple(self.shape)} as {rows} rows")
        self.rows = rows

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        if self.rows is not None:
            return (self.rows, self.shape.numel() // self.rows)
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
        return wire.float().reshape(self.coeff_shape)

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return coeffs.reshape(self.shape)

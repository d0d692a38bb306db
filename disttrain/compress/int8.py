"""Payloads of codes with one fp32 scale per coefficient row, and the int8 one."""

from __future__ import annotations

from abc import abstractmethod

import torch

from disttrain.compress.base import Compressor, CompressorWrapper
from disttrain.kernels import dequantize_rows, quantize_rows

_SCALE_BYTES = 4


class RowScaledPayload(CompressorWrapper):
    """Wraps a summable compressor and sends its coefficients as codes with one scale per row.

    Wire layout (uint8): the row scales as fp32 bytes, then the code bytes. Payloads are not
    summable, so the communication layer all_gathers them and decodes each one. Subclasses
    say how rows of coefficients become code bytes and back.
    """

    def __init__(self, inner: Compressor):
        if not inner.summable or len(inner.coeff_shape) == 0:
            raise ValueError(f"{type(self).__name__} wraps a summable compressor with at least 1-D coefficients")
        super().__init__(inner)
        self.summable = False
        self.rows = inner.coeff_shape[0]

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.uint8

    def wire_numel(self) -> int:
        return self.rows * _SCALE_BYTES + self.code_bytes()

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        codes, scales = self.quantize(self.inner.decode(self.inner.encode(grad)).reshape(self.rows, -1))
        return torch.cat([scales.view(torch.uint8), codes])

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        split = self.rows * _SCALE_BYTES
        scales = wire[:split].clone().view(torch.float32)
        return self.dequantize(wire[split:], scales).reshape(self.coeff_shape)

    @abstractmethod
    def code_bytes(self) -> int:
        """Bytes of codes per payload."""

    @abstractmethod
    def quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat uint8 code bytes, one fp32 scale per row) for a 2-D tensor of coefficients."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The rows of coefficients that code bytes and row scales stand for."""


class Int8Payload(RowScaledPayload):
    """Symmetric int8 codes, one scale per row (the kernels' quantize_rows)."""

    def code_bytes(self) -> int:
        return self.inner.coeff_numel()

    def quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, scales = quantize_rows(rows)
        return values.reshape(-1).view(torch.uint8), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(codes.clone().view(torch.int8).reshape(self.rows, -1), scales)

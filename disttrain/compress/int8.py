"""int8 payloads with one fp32 scale per coefficient row."""

from __future__ import annotations

import torch

from disttrain.compress.base import Compressor, CompressorWrapper
from disttrain.kernels import dequantize_rows, quantize_rows

_SCALE_BYTES = 4


class Int8Payload(CompressorWrapper):
    """Wraps a compressor and quantises its coefficients to int8, one scale per row.

    Wire layout (uint8): the row scales as fp32 bytes, then the int8 values. Payloads are
    not summable, so the communication layer all_gathers them and decodes each one.
    """

    def __init__(self, inner: Compressor):
        if not inner.summable or len(inner.coeff_shape) == 0:
            raise ValueError("Int8Payload wraps a summable compressor with at least 1-D coefficients")
        super().__init__(inner)
        self.summable = False
        self.rows = inner.coeff_shape[0]

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.uint8

    def wire_numel(self) -> int:
        return self.rows * _SCALE_BYTES + self.inner.coeff_numel()

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        values, scales = quantize_rows(self.inner.decode(self.inner.encode(grad)))
        return torch.cat([scales.view(torch.uint8), values.reshape(-1).view(torch.uint8)])

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        split = self.rows * _SCALE_BYTES
        scales = wire[:split].clone().view(torch.float32)
        values = wire[split:].clone().view(torch.int8).reshape(self.rows, -1)
        return dequantize_rows(values, scales).reshape(self.coeff_shape)

"""Builds the compressor for one parameter from a declarative spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from disttrain.compress.base import Compressor
from disttrain.compress.dense import DenseCompressor
from disttrain.compress.error_feedback import ErrorFeedback
from disttrain.compress.int8 import Int8Payload
from disttrain.compress.lowrank import LowRankCompressor, SideChoice, as_matrix_shape, choose_side
from disttrain.compress.seeded import SeededBasis
from disttrain.compress.svd import SVDBasis
from disttrain.kernels.seeded import Distribution

BasisKind = Literal["dense", "svd", "seeded"]
PayloadKind = Literal["fp32", "bf16", "int8"]
_WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


@dataclass(frozen=True)
class CompressionSpec:
    """How every parameter of a model is compressed."""

    basis: BasisKind = "seeded"
    rank: int = 8
    side: SideChoice = "auto"
    refresh_every: int = 200
    distribution: Distribution = "gaussian"
    payload: PayloadKind = "fp32"
    error_feedback: bool = True
    dense_threshold: int = 4096
    quantize_small: bool = False  # int8 payloads also for the parameters sent whole (1-D and small ones)

    def validate(self) -> None:
        if self.basis not in ("dense", "svd", "seeded"):
            raise ValueError(f"unknown basis {self.basis!r}; use 'dense', 'svd' or 'seeded'")
        if self.payload not in _WIRE_DTYPES:
            raise ValueError(f"unknown payload {self.payload!r}; use 'fp32', 'bf16' or 'int8'")
        if self.basis != "dense" and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown distribution {self.distribution!r}; use 'gaussian' or 'rademacher'")
        choose_side((1, 1), self.side)

    def compresses(self, shape: torch.Size) -> bool:
        """Whether a parameter of this shape is projected; 1-D and small ones go dense."""
        if self.basis == "dense" or len(shape) < 2 or shape.numel() < self.dense_threshold:
            return False
        return self.rank < min(as_matrix_shape(shape))


def build_compressor(spec: CompressionSpec, shape: torch.Size, param_id: int, seed: int) -> Compressor:
    """The compressor for parameter number ``param_id`` (its index in the model's parameters)."""
    shape = torch.Size(shape)
    wire_dtype = _WIRE_DTYPES[spec.payload]
    compressor: Compressor
    if spec.compresses(shape):
        side = choose_side(as_matrix_shape(shape), spec.side)
        reduced = as_matrix_shape(shape)[0 if side == "left" else 1]
        if spec.basis == "svd":
            basis = SVDBasis(reduced, spec.rank, spec.refresh_every)
        else:
            basis = SeededBasis(reduced, spec.rank, seed, param_id, spec.refresh_every, spec.distribution)
        compressor = LowRankCompressor(shape, basis, side, wire_dtype)
    elif spec.payload == "int8" and (spec.quantize_small or spec.basis == "dense" and len(shape) >= 2):
        # A dense int8 payload (e.g. DiLoCo's pseudo-gradients): one scale per row of a matrix,
        # one for a whole vector.
        compressor = DenseCompressor(shape, wire_dtype, rows=as_matrix_shape(shape)[0] if len(shape) >= 2 else 1)
    else:
        return DenseCompressor(shape, wire_dtype)
    if spec.payload == "int8":
        compressor = Int8Payload(compressor)
    if spec.error_feedback:
        compressor = ErrorFeedback(compressor)
    return compressor

"""Builds the compressor for one parameter from a declarative spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from disttrain.compress.base import Compressor
from disttrain.compress.dense import DenseCompressor
from disttrain.compress.error_feedback import ErrorFeedback
from disttrain.compress.int8 import Int8Payload
from disttrain.compress.lowbit import LowBitPayload
from disttrain.compress.lowrank import LowRankCompressor, SideChoice, as_matrix_shape, choose_side
from disttrain.compress.power_step import PowerStepCompressor
from disttrain.compress.seeded import SeededBasis
from disttrain.compress.sign_votes import SignVotes
from disttrain.compress.sparse_momentum import SparseMomentum
from disttrain.compress.sparse_rows import SparseRowsBasis
from disttrain.compress.svd import SVDBasis
from disttrain.kernels.seeded import Distribution

BasisKind = Literal["dense", "svd", "seeded", "power", "sparse_rows", "sparse_momentum", "sign_votes"]
BASIS_KINDS = get_args(BasisKind)
VOTE_KINDS = ("sparse_momentum", "sign_votes")  # payloads that are update directions, not gradients
VoteReduction = Literal["all_gather", "owners"]
VOTE_REDUCTIONS = get_args(VoteReduction)
PayloadKind = Literal["fp32", "bf16", "int8", "int4", "int2", "int1"]
_WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MomentumDtype = Literal["fp32", "bf16"]
QUANTIZED_BITS = {"int8": 8, "int4": 4, "int2": 2, "int1": 1}  # per-row scaled codes; int1 is a scaled sign


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
    quantize_small: bool = False  # quantised payloads also for the parameters sent whole (1-D and small ones)
    per_chunk: int = 4  # sparse_momentum: entries sent per chunk of 256
    momentum_decay: float = 0.9  # sparse_momentum: m <- decay * m + g
    feedback_momentum: float = 0.0  # error feedback keeps this share of what was sent (Dion's momentum)
    vote_every: int = 5  # sign_votes: one coordinate in this many is voted per step
    lion_betas: tuple[float, float] = (0.9, 0.99)  # sign_votes: Lion's interpolation and momentum decay
    explore: int = 0  # power: of the rank's directions, this many are fresh seeded random ones each step
    vote_reduction: VoteReduction = "all_gather"  # sparse_momentum: every payload to everyone, or summed by chunk owners
    owner_keep: int = 8  # vote_reduction "owners": vote positions per chunk of 256 an owner keeps and sends on
    momentum_dtype: MomentumDtype = "fp32"  # sparse_momentum, sign_votes: how the kept momentum is stored

    def validate(self) -> None:
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"unknown basis {self.basis!r}; use one of {', '.join(map(repr, BASIS_KINDS))}")
        if self.basis in VOTE_KINDS and (self.payload != "fp32" or self.error_feedback):
            raise ValueError(
                f"{self.basis} sends its own votes and keeps its own momentum: "
                "use payload='fp32' and error_feedback=False with it"
            )
        if self.vote_reduction not in VOTE_REDUCTIONS:
            raise ValueError(f"unknown vote_reduction {self.vote_reduction!r}; use one of {', '.join(map(repr, VOTE_REDUCTIONS))}")
        if self.vote_reduction == "owners" and self.basis != "sparse_momentum":
            raise ValueError(
                f"vote_reduction='owners' sums sparse momentum votes by chunk owner; basis {self.basis!r} sends "
                "no such votes: use basis='sparse_momentum' with it, or vote_reduction='all_gather'"
            )
        if not 1 <= self.owner_keep <= 256:
            raise ValueError(f"owner_keep must be in [1, 256] (positions kept per chunk of 256), got {self.owner_keep}")
        if self.momentum_dtype not in get_args(MomentumDtype):
            raise ValueError(f"unknown momentum_dtype {self.momentum_dtype!r}; use 'fp32' or 'bf16'")
        if self.payload not in _WIRE_DTYPES and self.payload not in QUANTIZED_BITS:
            known = ", ".join(repr(kind) for kind in (*_WIRE_DTYPES, *QUANTIZED_BITS))
            raise ValueError(f"unknown payload {self.payload!r}; use one of {known}")
        if self.projects and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.explore and (self.basis != "power" or not 0 < self.explore < self.rank):
            raise ValueError(
                f"explore={self.explore} needs basis='power' and 0 < explore < rank (rank is {self.rank}): "
                "exploring directions replace some of a power-step factor's followed ones"
            )
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown distribution {self.distribution!r}; use 'gaussian' or 'rademacher'")
        choose_side((1, 1), self.side)

    @property
    def quantized(self) -> bool:
        """Whether payloads are per-row scaled codes (which travel by all_gather)."""
        return self.payload in QUANTIZED_BITS

    @property
    def projects(self) -> bool:
        """Whether gradients are projected onto a low-rank basis."""
        return self.basis in ("svd", "seeded", "power", "sparse_rows")

    def compresses(self, shape: torch.Size) -> bool:
        """Whether a parameter of this shape is projected; 1-D and small ones go dense."""
        if not self.projects or len(shape) < 2 or shape.numel() < self.dense_threshold:
            return False
        return self.rank < min(as_matrix_shape(shape))


def build_compressor(spec: CompressionSpec, shape: torch.Size, param_id: int, seed: int) -> Compressor:
    """The compressor for parameter number ``param_id`` (its index in the model's parameters)."""
    shape = torch.Size(shape)
    if spec.basis == "sparse_momentum":
        return SparseMomentum(shape, spec.per_chunk, spec.momentum_decay, _WIRE_DTYPES[spec.momentum_dtype])
    if spec.basis == "sign_votes":
        return SignVotes(shape, spec.vote_every, *spec.lion_betas, seed, param_id, _WIRE_DTYPES[spec.momentum_dtype])
    wire_dtype = _WIRE_DTYPES.get(spec.payload, torch.float32)  # quantised payloads wrap fp32 coefficients
    compressor: Compressor
    if spec.compresses(shape) and spec.basis == "power":
        compressor = PowerStepCompressor(shape, spec.rank, seed, param_id, wire_dtype, spec.explore)
    elif spec.compresses(shape):
        side = choose_side(as_matrix_shape(shape), spec.side)
        reduced = as_matrix_shape(shape)[0 if side == "left" else 1]
        if spec.basis == "svd":
            basis = SVDBasis(reduced, spec.rank, spec.refresh_every)
        elif spec.basis == "sparse_rows":
            basis = SparseRowsBasis(reduced, spec.rank, spec.refresh_every)
        else:
            basis = SeededBasis(reduced, spec.rank, seed, param_id, spec.refresh_every, spec.distribution)
        compressor = LowRankCompressor(shape, basis, side, wire_dtype)
    elif spec.quantized and (spec.quantize_small or spec.basis == "dense" and len(shape) >= 2):
        # A dense quantised payload (e.g. DiLoCo's pseudo-gradients): one scale per row of a
        # matrix, one for a whole vector.
        compressor = DenseCompressor(shape, wire_dtype, rows=as_matrix_shape(shape)[0] if len(shape) >= 2 else 1)
    else:
        return DenseCompressor(shape, wire_dtype)
    if spec.payload == "int8":
        compressor = Int8Payload(compressor)
    elif spec.quantized:
        compressor = LowBitPayload(compressor, QUANTIZED_BITS[spec.payload])
    if spec.error_feedback:
        compressor = ErrorFeedback(compressor, spec.feedback_momentum)
    return compressor

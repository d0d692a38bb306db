"""Compressors: pure tensor code that turns a gradient into a small wire payload and back."""

from disttrain.compress.base import Compressor
from disttrain.compress.dense import DenseCompressor
from disttrain.compress.error_feedback import ErrorFeedback
from disttrain.compress.factory import CompressionSpec, build_compressor
from disttrain.compress.int8 import Int8Payload
from disttrain.compress.lowrank import LowRankCompressor
from disttrain.compress.seeded import SeededBasis
from disttrain.compress.svd import SVDBasis

__all__ = [
    "CompressionSpec",
    "Compressor",
    "DenseCompressor",
    "ErrorFeedback",
    "Int8Payload",
    "LowRankCompressor",
    "SVDBasis",
    "SeededBasis",
    "build_compressor",
]

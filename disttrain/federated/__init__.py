"""Federated fine-tuning building blocks: client data partitions and shared-seed zeroth-order steps."""

from disttrain.federated.partition import dirichlet_partition, iid_partition
from disttrain.federated.zeroth_order import (
    BYTES_PER_STEP,
    ZOConfig,
    ZOState,
    ZOStepResult,
    dequantize,
    quantize,
    zo_step,
)

__all__ = [
    "BYTES_PER_STEP",
    "ZOConfig",
    "ZOState",
    "ZOStepResult",
    "dequantize",
    "dirichlet_partition",
    "iid_partition",
    "quantize",
    "zo_step",
]

"""How the projection kernels multiply tiles: the precision policy both directions share."""

from __future__ import annotations

from typing import Any

import torch

from disttrain.kernels._triton import interpreted, jit, tl


def dot_dtype(data: torch.dtype) -> Any:
    """The dtype tile products run in, given the dtype of the big (m x n) operand.

    fp32 data multiplies as tf32x3 (three tensor-core passes, about fp32 accuracy). bf16 and
    fp16 data multiply in their own dtype with P rounded to it: the data carries no more
    precision than that, and the dot runs at full tensor-core rate. The interpreter's dot
    mishandles 16-bit floats (numpy has none), so under it everything multiplies in fp32.
    """
    if data == torch.bfloat16 and not interpreted():
        return tl.bfloat16
    if data == torch.float16 and not interpreted():
        return tl.float16
    return tl.float32


@jit()
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b, both operands cast to DOT_DTYPE (fp32 as tf32x3), accumulated in fp32."""
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc

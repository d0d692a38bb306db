"""fp32 to bf16, rounded up or down at random so that the result is right on average.

A value between two neighbouring bf16 numbers becomes the upper one with the probability of its
distance from the lower, so rounding adds noise but no bias: updates smaller than bf16's step
still move a weight, on average by as much as they should. The random bits come from a
counter-based hash of a key (``kernels/ops/seeded.py``), so every replica that rounds the same
values with the same key gets the same bits, on CPU and GPU alike.
"""

from __future__ import annotations

import torch

from disttrain.kernels.seeded import MASK32, StreamKey, random_bits

LOW_HALF = 0xFFFF  # the 16 mantissa bits that fp32 has and bf16 drops


def stochastic_round_to_bf16(values: torch.Tensor, key: StreamKey) -> torch.Tensor:
    """``values`` (fp32) rounded to bf16 at random, unbiased; the same ``key`` gives the same result."""
    bits = values.detach().float().contiguous().view(torch.int32).to(torch.int64) & MASK32
    counters = torch.arange(bits.numel(), device=bits.device).view(bits.shape)
    # Adding up to the low half's size to the bits carries into the kept half with the right probability
    # (for either sign: the bits are a magnitude); a carry into the exponent is the next binade's first value.
    rounded = (bits + (random_bits(counters, key) & LOW_HALF)) & (MASK32 ^ LOW_HALF)
    as_int32 = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return as_int32.view(torch.float32).to(torch.bfloat16)

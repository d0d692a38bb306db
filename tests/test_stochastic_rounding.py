"""Stochastic rounding to bf16: one of the two neighbours, right on average, the same for the same key."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disttrain.kernels.seeded import StreamKey
from disttrain.train.stochastic_rounding import stochastic_round_to_bf16

finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)


def neighbours(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above (in magnitude) ``value``: its high half, and one step more."""
    bits = value.view(torch.int32) & ~0xFFFF
    low = bits.view(torch.float32)
    high = (bits + 0x10000).view(torch.float32)
    return low, high


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.integers(0, 2**31 - 1))
def test_every_value_becomes_one_of_its_two_bf16_neighbours(values, seed):
    tensor = torch.tensor(values, dtype=torch.float32)
    rounded = stochastic_round_to_bf16(tensor, StreamKey.derive(seed)).float()
    low, high = neighbours(tensor)
    assert torch.all((rounded == low) | (rounded == high))


def test_a_value_bf16_holds_exactly_stays_as_it_is():
    exact = torch.tensor([1.0, -0.5, 3.0, 0.0, -1024.0]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact, StreamKey.derive(1)).float(), exact)


def test_the_same_key_rounds_alike_and_another_key_differently():
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    first, again = (stochastic_round_to_bf16(values, StreamKey.derive(7, 3)) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, stochastic_round_to_bf16(values, StreamKey.derive(7, 4)))


def test_on_average_over_keys_the_rounding_has_no_bias():
    value = torch.full((1,), 1.0 + 2**-10)  # an eighth of the way from 1.0 to the next bf16 value, 1 + 2**-7
    low, high = neighbours(value)
    share_up = float((value - low) / (high - low))
    rounded = torch.stack([stochastic_round_to_bf16(value, StreamKey.derive(key)).float() for key in range(4000)])
    observed_up = float((rounded == high).float().mean())
    assert abs(observed_up - share_up) < 0.03
    assert abs(float(rounded.mean() - value)) < 0.05 * float(high - low)


def test_round_to_nearest_would_lose_an_update_that_stochastic_rounding_keeps_on_average():
    start = torch.ones(20000)
    update = torch.full_like(start, 2**-10)  # below half of bf16's step at 1.0: nearest rounding drops it
    nearest = (start + update).to(torch.bfloat16).float()
    stochastic = stochastic_round_to_bf16(start + update, StreamKey.derive(5)).float()
    assert torch.equal(nearest, start)
    assert abs(float((stochastic - start).mean()) - 2**-10) < 2**-12

"""Low-bit payloads (int4, int2, int1): codes pack exactly, values land on their row's levels, sizes are as counted."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disttrain.compress import CompressionSpec, DenseCompressor, build_compressor
from disttrain.compress.lowbit import LowBitPayload, pack_codes, unpack_codes

bits = st.sampled_from([1, 2, 4])


@given(bits, st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_packed_codes_unpack_to_themselves(width, count, seed):
    codes = torch.randint(0, 1 << width, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, width)
    assert packed.numel() == math.ceil(count * width / 8)
    assert torch.equal(unpack_codes(packed, width, count), codes)


@settings(max_examples=50)
@given(bits, st.integers(1, 8), st.integers(1, 70), st.floats(1e-4, 1e3), st.integers(0, 2**31 - 1))
def test_each_value_decodes_to_the_nearest_level_of_its_row(width, rows, cols, scale, seed):
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    payload = LowBitPayload(DenseCompressor(grad.shape, rows=rows), width)
    wire = payload.encode(grad)
    decoded = payload.decode(wire)
    step = wire[: rows * 4].clone().view(torch.float32)[:, None]  # the wire starts with each row's step
    half_span = (1 << width) / 2 * step
    inside = grad.abs() <= half_span
    assert torch.all((decoded - grad).abs()[inside] <= (step / 2 * (1 + 1e-5)).expand_as(grad)[inside])
    # outside the levels a value is clipped to the outer level on its own side
    outer = ((1 << width) - 1) / 2 * step.expand_as(grad)
    assert torch.allclose(decoded[~inside], (grad.sign() * outer)[~inside])


@pytest.mark.parametrize("width", [1, 2, 4])
def test_one_bit_per_value_is_a_scaled_sign_and_zeros_stay_zeros(width):
    payload = LowBitPayload(DenseCompressor(torch.Size((3, 16)), rows=3), width)
    assert torch.equal(payload.decode(payload.encode(torch.zeros(3, 16))), torch.zeros(3, 16))
    if width == 1:
        grad = torch.randn(3, 16)
        decoded = payload.decode(payload.encode(grad))
        assert torch.equal(decoded.sign(), grad.sign())
        assert torch.allclose(decoded.abs(), 0.798 * grad.pow(2).mean(dim=1, keepdim=True).sqrt().expand(3, 16), rtol=1e-3)


@pytest.mark.parametrize(("payload", "width"), [("int4", 4), ("int2", 2), ("int1", 1)])
def test_wire_size_is_the_row_scales_plus_the_packed_codes(payload, width):
    spec = CompressionSpec(basis="dense", payload=payload, quantize_small=True)
    matrix, vector = (build_compressor(spec, torch.Size(shape), 0, 0) for shape in ((256, 1024), (257,)))
    assert matrix.wire_bytes() == 256 * 4 + 256 * 1024 * width // 8
    assert vector.wire_bytes() == 4 + math.ceil(257 * width / 8)


def test_low_bit_payloads_wrap_only_summable_compressors():
    with pytest.raises(ValueError, match="bits must be one of"):
        LowBitPayload(DenseCompressor(torch.Size((4, 4)), rows=4), 3)
    with pytest.raises(ValueError, match="wraps a summable compressor"):
        LowBitPayload(LowBitPayload(DenseCompressor(torch.Size((4, 4)), rows=4), 2), 2)

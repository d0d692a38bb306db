"""Compressor properties: exactness, error feedback's books balance, state, and bad input."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from disttrain.compress import (
    CompressionSpec,
    DenseCompressor,
    ErrorFeedback,
    Int8Payload,
    LowRankCompressor,
    SeededBasis,
    SVDBasis,
    build_compressor,
)

shapes = st.tuples(st.integers(6, 48), st.integers(6, 48))
seeds = st.integers(0, 2**31 - 1)


def low_rank_matrix(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)


def svd_compressor(shape, rank: int) -> LowRankCompressor:
    side = "left" if shape[0] >= shape[1] else "right"
    reduced = shape[0] if side == "left" else shape[1]
    return LowRankCompressor(torch.Size(shape), SVDBasis(reduced, rank), side)


@given(shapes, st.integers(1, 5), seeds)
def test_svd_compressor_is_exact_on_rank_r_gradients(shape, rank, seed):
    grad = low_rank_matrix(*shape, rank, seed)
    compressor = svd_compressor(shape, rank)
    compressor.set_basis(compressor.propose_basis(grad))
    assert torch.allclose(compressor.round_trip(grad), grad, atol=1e-4 * grad.abs().max().item() + 1e-5)


@given(shapes, seeds)
def test_dense_compressor_is_exact(shape, seed):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(DenseCompressor(torch.Size(shape)).round_trip(grad), grad)


@given(shapes, st.integers(1, 5), seeds)
def test_seeded_compressor_is_exact_on_gradients_inside_its_subspace(shape, rank, seed):
    m, n = max(shape), min(shape)
    basis = SeededBasis(m, rank, seed=seed, param_id=0)
    compressor = LowRankCompressor(torch.Size((m, n)), basis, "left")
    coeffs = torch.randn(rank, n, generator=torch.Generator().manual_seed(seed))
    p = basis.matrix()
    # Inside span(P), the projector P (P^T P)^-1 P^T is exact; the compressor applies P P^T,
    # so feed it G = P (P^T P)^-1 C, whose coefficients are exactly C.
    grad = p @ torch.linalg.solve(p.t() @ p, coeffs)
    assert torch.allclose(compressor.decode(compressor.encode(grad)), coeffs, atol=1e-4)


payloads = st.sampled_from(["fp32", "int8", "int4", "int2", "int1"])


@given(shapes, st.integers(1, 4), seeds, st.integers(2, 6), st.sampled_from(["svd", "seeded", "power", "sparse_rows", "dense"]), payloads)
def test_error_feedback_sent_plus_residual_equals_sum_of_gradients(shape, rank, seed, steps, basis, payload):
    assume(basis != "dense" or payload != "fp32")  # sent whole: nothing to feed back
    if rank >= min(shape):
        rank = min(shape) - 1
    spec = CompressionSpec(basis=basis, rank=rank, refresh_every=2, payload=payload, dense_threshold=1)
    compressor = build_compressor(spec, torch.Size(shape), param_id=3, seed=seed)
    assert isinstance(compressor, ErrorFeedback)
    generator = torch.Generator().manual_seed(seed)
    grads_total = torch.zeros(shape)
    sent_total = torch.zeros(shape)
    for step in range(steps):
        grad = torch.randn(shape, generator=generator)
        compressor.begin_step(step)
        if compressor.needs_shared_basis(step):
            compressor.set_basis(compressor.propose_basis(grad))
        coeffs = compressor.decode(compressor.encode(grad))
        sent_total += compressor.reconstruct(coeffs)
        compressor.accept_mean(coeffs)  # one worker: its own coefficients are the mean
        compressor.commit()
        grads_total += grad
    assert torch.allclose(sent_total + compressor.residual, grads_total, atol=1e-4)


def test_rollback_keeps_the_committed_residual():
    compressor = build_compressor(CompressionSpec(basis="seeded", rank=2, dense_threshold=1), torch.Size((16, 8)), 0, 0)
    compressor.begin_step(0)
    compressor.encode(torch.randn(16, 8))
    compressor.commit()
    committed = compressor.residual.clone()
    compressor.encode(torch.randn(16, 8))
    compressor.rollback()
    assert torch.equal(compressor.residual, committed)
    compressor.commit()  # nothing pending: the residual stays
    assert torch.equal(compressor.residual, committed)


@given(st.integers(1, 8), st.integers(1, 64), seeds)
def test_int8_rows_are_within_half_a_step_of_the_input(rows, cols, seed):
    coeffs = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    payload = Int8Payload(DenseCompressor(torch.Size((rows, cols))))
    wire = payload.encode(coeffs)
    assert wire.dtype == torch.uint8 and wire.numel() == rows * 4 + rows * cols
    step = coeffs.abs().amax(dim=1, keepdim=True) / 127
    assert ((payload.decode(wire) - coeffs).abs() <= step / 2 + 1e-6).all()


def test_int8_of_zeros_decodes_to_zeros():
    payload = Int8Payload(DenseCompressor(torch.Size((3, 5))))
    assert torch.equal(payload.decode(payload.encode(torch.zeros(3, 5))), torch.zeros(3, 5))


@pytest.mark.parametrize("basis", ["svd", "seeded", "power", "sparse_rows"])
@pytest.mark.parametrize("payload", ["fp32", "int8", "int2"])
def test_state_dict_round_trips_exactly(basis, payload):
    spec = CompressionSpec(basis=basis, rank=3, payload=payload, dense_threshold=1)
    source = build_compressor(spec, torch.Size((20, 12)), 1, 42)
    source.begin_step(5)
    grad = torch.randn(20, 12)
    if source.needs_shared_basis(5):
        source.set_basis(source.propose_basis(grad))
    source.accept_mean(source.decode(source.encode(grad)))
    source.commit()
    restored = build_compressor(spec, torch.Size((20, 12)), 1, 42)
    restored.load_state_dict(source.state_dict())
    nxt = torch.randn(20, 12)
    assert torch.equal(restored.encode(nxt), source.encode(nxt))


def test_vectors_and_small_matrices_go_dense():
    spec = CompressionSpec(basis="seeded", rank=4, dense_threshold=1000)
    assert isinstance(build_compressor(spec, torch.Size((4096,)), 0, 0), DenseCompressor)
    assert isinstance(build_compressor(spec, torch.Size((20, 20)), 0, 0), DenseCompressor)
    assert not isinstance(build_compressor(spec, torch.Size((40, 40)), 0, 0), DenseCompressor)


def test_projection_reduces_the_longer_side_for_the_smallest_payload():
    spec = CompressionSpec(basis="seeded", rank=4, error_feedback=False, dense_threshold=1)
    assert build_compressor(spec, torch.Size((256, 64)), 0, 0).coeff_shape == (4, 64)
    assert build_compressor(spec, torch.Size((64, 256)), 0, 0).coeff_shape == (4, 64)


def test_rank_not_below_the_smaller_dimension_is_refused():
    with pytest.raises(ValueError, match=r"rank 8 must be smaller than min\(m, n\) = 8"):
        LowRankCompressor(torch.Size((32, 8)), SVDBasis(32, 8), "left")


def test_integer_gradient_is_refused_with_its_dtype():
    compressor = build_compressor(CompressionSpec(basis="seeded", rank=2, dense_threshold=1), torch.Size((16, 8)), 0, 0)
    with pytest.raises(TypeError, match="dtype torch.int64.*floating-point"):
        compressor.encode(torch.ones(16, 8, dtype=torch.int64))


def test_gradient_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(8, 16\).*built for \(16, 8\)"):
        DenseCompressor(torch.Size((16, 8))).encode(torch.zeros(8, 16))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("basis", "fourier", "unknown basis"), ("payload", "int3", "unknown payload"), ("rank", 0, "rank must be >= 1"),
     ("side", "top", "unknown projection side"), ("distribution", "cauchy", "unknown distribution")],
)
def test_bad_spec_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        CompressionSpec(**{field: value}).validate()


def test_svd_basis_used_before_it_is_set_says_so():
    compressor = svd_compressor((16, 8), 2)
    with pytest.raises(RuntimeError, match="basis has not been set"):
        compressor.encode(torch.zeros(16, 8))

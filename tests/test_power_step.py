"""A basis that follows the gradient for free (one power step per exchange, sides alternate), and
orthogonalised low-rank updates on it."""

import pytest
import torch
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import train_and_digest

from disttrain.compress import CompressionSpec, build_compressor
from disttrain.compress.power_step import PowerStepCompressor
from disttrain.optim import ProjectedAdamW
from disttrain.optim.lowrank_orthogonal import orthogonalise

shapes = st.tuples(st.integers(3, 24), st.integers(3, 24))
seeds = st.integers(0, 2**16)


def exchange(compressor: PowerStepCompressor, grad: torch.Tensor) -> torch.Tensor:
    """One worker's step: what it rebuilds, then the next factor from its own (= the mean) coefficients."""
    coeffs = compressor.decode(compressor.encode(grad))
    rebuilt = compressor.reconstruct(coeffs)
    compressor.accept_mean(coeffs)
    compressor.commit()
    return rebuilt


@settings(deadline=None)
@given(shapes, seeds, st.integers(1, 2))
def test_each_step_projects_onto_the_factor_and_the_next_factor_is_the_mean_on_the_other_side(shape, seed, rank):
    compressor = PowerStepCompressor(torch.Size(shape), rank, seed, param_id=0)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    factor = compressor.factor.clone()
    rebuilt = exchange(compressor, grad)
    assert torch.allclose(rebuilt, factor @ factor.t() @ grad, atol=1e-4)
    assert compressor.transposed and compressor.factor.shape == (shape[1], rank)
    assert torch.allclose(compressor.factor.t() @ compressor.factor, torch.eye(rank), atol=1e-5)
    # The new factor spans the columns of (P^T G)^T = G^T P, the power step's product.
    product = grad.t() @ factor
    assert torch.allclose(compressor.factor @ compressor.factor.t() @ product, product, atol=1e-3)


@settings(deadline=None)
@given(shapes, seeds, st.integers(1, 2))
def test_a_rank_r_gradient_is_sent_exactly_from_the_second_step(shape, seed, rank):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)
    compressor = PowerStepCompressor(torch.Size(shape), rank, seed, param_id=0)
    exchange(compressor, grad)
    assert torch.allclose(exchange(compressor, grad), grad, atol=1e-3 * grad.abs().max().item())


def test_rollback_keeps_the_factor_and_its_side():
    compressor = PowerStepCompressor(torch.Size((16, 8)), 2, seed=0, param_id=0)
    factor = compressor.factor.clone()
    compressor.accept_mean(compressor.decode(compressor.encode(torch.randn(16, 8))))
    compressor.rollback()
    compressor.commit()  # nothing pending
    assert torch.equal(compressor.factor, factor) and not compressor.transposed


@settings(deadline=None)
@given(st.tuples(st.integers(4, 24), st.integers(4, 24)), seeds, st.integers(2, 3), st.integers(0, 5))
def test_an_exploring_factor_follows_the_top_directions_and_adds_fresh_orthogonal_ones(shape, seed, rank, step):
    explore = 1
    compressor = PowerStepCompressor(torch.Size(shape), rank, seed, param_id=0, explore=explore)
    compressor.begin_step(step)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    product = grad.t() @ compressor.factor
    exchange(compressor, grad)
    factor = compressor.factor
    assert torch.allclose(factor.t() @ factor, torch.eye(rank), atol=1e-5)
    top = torch.linalg.svd(product.double(), full_matrices=False)[0][:, : rank - explore].float()
    followed = factor[:, : rank - explore]
    assert torch.allclose(followed @ followed.t() @ top, top, atol=1e-3)
    # The explored direction is the same on every worker at a step and new at the next one.
    twin = PowerStepCompressor(torch.Size(shape), rank, seed, param_id=0, explore=explore)
    twin.begin_step(step)
    exchange(twin, grad)
    assert torch.equal(twin.factor, factor)
    later = PowerStepCompressor(torch.Size(shape), rank, seed, param_id=0, explore=explore)
    later.begin_step(step + 1)
    exchange(later, grad)
    assert not torch.allclose(later.factor[:, -1].abs(), factor[:, -1].abs(), atol=1e-3)


def test_exploring_needs_a_followed_direction_and_a_power_basis():
    with pytest.raises(ValueError, match=r"explore must be in \[0, rank\)"):
        PowerStepCompressor(torch.Size((16, 8)), 2, seed=0, param_id=0, explore=2)
    with pytest.raises(ValueError, match="needs basis='power'"):
        CompressionSpec(basis="seeded", explore=2).validate()


def test_payload_size_follows_the_side_the_factor_is_on():
    compressor = PowerStepCompressor(torch.Size((16, 8)), 2, seed=0, param_id=0)
    assert compressor.wire_numel() == 2 * 8
    exchange(compressor, torch.randn(16, 8))
    assert compressor.wire_numel() == 2 * 16


def test_a_factor_saved_for_another_shape_is_refused():
    compressor = PowerStepCompressor(torch.Size((16, 8)), 2, seed=0, param_id=0)
    with pytest.raises(ValueError, match="different model or rank"):
        compressor.load_state_dict({"factor": torch.zeros(16, 3), "transposed": False})


def test_the_rank_must_fit_the_matrix():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\)"):
        PowerStepCompressor(torch.Size((16, 8)), 8, seed=0, param_id=0)


def test_the_factory_builds_it_for_matrices_and_sends_vectors_whole():
    spec = CompressionSpec(basis="power", rank=2, error_feedback=False, dense_threshold=1)
    assert isinstance(build_compressor(spec, torch.Size((16, 8)), 0, 0), PowerStepCompressor)
    assert not isinstance(build_compressor(spec, torch.Size((16,)), 0, 0), PowerStepCompressor)


@pytest.mark.parametrize(("method", "rank"), [("power-r8", 4), ("power-int8-r8", 4), ("power-int4-r16-explore4", 8)])
def test_replicas_stay_identical_while_the_basis_follows_and_loss_falls(method, rank):
    overrides = {"method": method, "rank": rank, "steps": 12, "eval_every": 4, "digest_every": 100}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss - 0.2


@settings(deadline=None)
@given(st.integers(1, 4), st.integers(5, 12), seeds)
def test_orthogonalised_coefficients_keep_the_directions_with_unit_singular_values(rank, width, seed):
    coeffs = torch.randn(rank, width, generator=torch.Generator().manual_seed(seed))
    orth = orthogonalise(coeffs)
    assert torch.allclose(orth @ orth.t(), torch.eye(rank), atol=1e-5)
    # orth is the polar factor: C = (C orth^T) orth with C orth^T = U S U^T symmetric and PSD
    stretch = coeffs @ orth.t()
    assert torch.allclose(stretch, stretch.t(), atol=1e-4) and torch.linalg.eigvalsh(stretch).min() > -1e-4
    assert torch.allclose(stretch @ orth, coeffs, atol=1e-4)


def test_zero_coefficients_give_no_update():
    assert torch.count_nonzero(orthogonalise(torch.zeros(3, 7))) == 0


def test_feedback_momentum_keeps_that_share_of_what_was_sent():
    spec = CompressionSpec(basis="power", rank=2, dense_threshold=1, feedback_momentum=0.9)
    compressor = build_compressor(spec, torch.Size((16, 8)), 0, 0)
    grad = torch.randn(16, 8)
    sent = compressor.reconstruct(compressor.decode(compressor.encode(grad)))
    compressor.commit()
    assert torch.allclose(compressor.residual, grad - 0.1 * sent, atol=1e-6)


def test_replicas_stay_identical_with_orthogonalised_updates_and_loss_falls():
    overrides = {"method": "power-int8-orth-r8", "rank": 4, "steps": 12, "eval_every": 4, "digest_every": 100}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss - 0.2


class OwnCoefficients:
    """A coefficient source that hands the optimizer one worker's own coefficients."""

    def __init__(self, compressor: PowerStepCompressor):
        self.compressor = compressor
        self.coeffs: torch.Tensor | None = None

    def coefficients(self, param):
        return self.coeffs, self.compressor


def test_adam_moments_in_the_projected_space_are_refused_once_the_basis_changes_side():
    weight = torch.nn.Parameter(torch.zeros(16, 8))
    source = OwnCoefficients(PowerStepCompressor(torch.Size((16, 8)), 2, seed=0, param_id=0))
    optimizer = ProjectedAdamW([weight], source=source)
    source.coeffs = source.compressor.decode(source.compressor.encode(torch.randn(16, 8)))
    optimizer.step()
    exchange(source.compressor, torch.randn(16, 8))  # the next step sends the other side
    source.coeffs = source.compressor.decode(source.compressor.encode(torch.randn(16, 8)))
    with pytest.raises(ValueError, match="use it with the 'adamw' or 'orthogonal' optimizer"):
        optimizer.step()

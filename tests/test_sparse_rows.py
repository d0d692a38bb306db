"""GRASS's sparse projection: the basis selects the rows of largest norm, and a refresh sends their indices."""

import pytest
import torch
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import train_and_digest

from disttrain.compress import CompressionSpec, build_compressor
from disttrain.compress.lowrank import LowRankCompressor
from disttrain.compress.sparse_rows import SparseRowsBasis

seeds = st.integers(0, 2**16)


def rows_compressor(m: int, n: int, rank: int) -> LowRankCompressor:
    return LowRankCompressor(torch.Size((m, n)), SparseRowsBasis(m, rank), "left")


@settings(deadline=None)
@given(st.integers(3, 24), st.integers(3, 24), seeds, st.data())
def test_coefficients_are_the_rows_of_largest_norm_and_reconstruction_puts_them_back(m, n, seed, data):
    rank = data.draw(st.integers(1, min(m, n) - 1))
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    compressor = rows_compressor(m, n, rank)
    compressor.set_basis(compressor.propose_basis(grad))
    rows = grad.norm(dim=1).topk(rank).indices.sort().values
    assert torch.equal(compressor.decode(compressor.encode(grad)), grad[rows])
    rebuilt = compressor.round_trip(grad)
    assert torch.equal(rebuilt[rows], grad[rows])
    assert rebuilt.count_nonzero() <= rank * n and rebuilt.abs().sum() <= grad.abs().sum()


@settings(deadline=None)
@given(st.integers(4, 24), st.integers(4, 24), seeds)
def test_the_explicit_basis_is_unit_columns_that_project_alike(m, n, seed):
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    basis = SparseRowsBasis(m, 3)
    basis.receive(basis.propose(grad))
    p = basis.explicit()
    assert torch.equal(p.t() @ p, torch.eye(3))
    assert torch.equal(p.t() @ grad, basis.project(grad))
    twin = SparseRowsBasis(m, 3)
    twin.set(p)
    assert torch.equal(twin.rows, basis.rows)


def test_rows_are_re_chosen_on_the_refresh_schedule_not_every_step():
    compressor = build_compressor(CompressionSpec(basis="sparse_rows", rank=2, refresh_every=5, dense_threshold=1), torch.Size((16, 8)), 0, 0)
    due = []
    for step in range(12):
        compressor.begin_step(step)
        grad = torch.randn(16, 8)
        if compressor.needs_shared_basis(step):
            due.append(step)
            compressor.set_basis(compressor.propose_basis(grad))
        compressor.encode(grad)
        compressor.commit()
    assert due == [0, 5, 10]


def test_a_refresh_broadcasts_the_row_indices_not_a_matrix():
    assert rows_compressor(768, 256, 8).basis_numel() == 8


@pytest.mark.parametrize("indices", [[0.0, 0.0], [0.0, 99.0], [1.0]])
def test_indices_that_do_not_name_distinct_rows_are_refused(indices):
    with pytest.raises(ValueError, match=r"2 distinct row indices in \[0, 16\)"):
        SparseRowsBasis(16, 2).receive(torch.tensor(indices))


def test_a_matrix_that_is_not_unit_columns_is_refused():
    with pytest.raises(ValueError, match="not one"):
        SparseRowsBasis(4, 2).set(torch.ones(4, 2))


def test_the_basis_used_before_it_is_chosen_says_so():
    compressor = build_compressor(CompressionSpec(basis="sparse_rows", rank=2, dense_threshold=1), torch.Size((16, 8)), 0, 0)
    with pytest.raises(RuntimeError, match="has not been set"):
        compressor.encode(torch.zeros(16, 8))


@pytest.mark.parametrize("method", ["grass-int8-r8", "grass-projected-r8"])
def test_replicas_stay_identical_across_refreshes_and_loss_falls(method):
    overrides = {"method": method, "rank": 4, "refresh_every": 5, "steps": 12, "eval_every": 4, "digest_every": 100}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss - 0.2

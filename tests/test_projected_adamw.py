"""ProjectedAdamW: one worker with an SVD basis is GaLore; state is low-rank and round-trips."""

import copy
from dataclasses import replace

import pytest
import torch
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import train_and_digest
from tiny import TINY_OPTIM

from disttrain.comm import CompressedAllReduce
from disttrain.compress import CompressionSpec, build_compressor
from disttrain.compress.svd import canonical_signs
from disttrain.optim import ProjectedAdamW
from disttrain.optim.projected_adamw import follow_basis

LR, SCALE, BETAS, EPS, WD = 0.01, 0.25, (0.9, 0.999), 1e-6, 0.1
RANK, REFRESH, STEPS = 3, 2, 5


def gradients(step: int, shape=(24, 10)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(step))


def galore_reference(weight: torch.Tensor) -> torch.Tensor:
    """galore-torch's AdamW with its 'std' projector (m >= n: right singular vectors).

    Singular vectors get disttrain's sign convention, which LAPACK leaves free and which
    matters once moments carry over a refresh.
    """
    exp_avg = exp_avg_sq = ortho = None
    for step in range(1, STEPS + 1):
        grad = gradients(step - 1)
        if (step - 1) % REFRESH == 0:
            ortho = canonical_signs(torch.linalg.svd(grad, full_matrices=False)[2][:RANK].t()).t()  # r x n
        low = grad @ ortho.t()
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = BETAS[0] * exp_avg + (1 - BETAS[0]) * low
        exp_avg_sq = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * low * low
        step_size = LR * (1 - BETAS[1] ** step) ** 0.5 / (1 - BETAS[0] ** step)
        update = (exp_avg / (exp_avg_sq.sqrt() + EPS)) @ ortho * SCALE
        weight = weight - step_size * update
        weight = weight - LR * WD * weight
    return weight


def galore_with_disttrain(rank: int, world: int) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.ones(24, 10))
    spec = CompressionSpec(basis="svd", rank=RANK, side="right", refresh_every=REFRESH, error_feedback=False, dense_threshold=1)
    reducer = CompressedAllReduce([weight], spec, seed=0, overlap=False)
    optimizer = ProjectedAdamW([weight], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, scale=SCALE, source=reducer)
    for step in range(STEPS):
        weight.grad = gradients(step)
        reducer.start_step(step)
        reducer.finish()
        optimizer.step()
        reducer.commit()
    return weight.detach(), optimizer.state_bytes()


def test_one_worker_with_an_svd_basis_is_galore():
    weight, state_bytes = run_workers(galore_with_disttrain, 1)[0]
    assert torch.allclose(weight, galore_reference(torch.ones(24, 10)), atol=1e-5)
    assert state_bytes == 2 * RANK * 24 * 4 + 4  # two r x m moments in fp32, plus the step counter


class Projections:
    """A coefficient source that projects locally with a fixed seeded basis."""

    def __init__(self, compressor):
        self.compressor = compressor
        self.grads: dict[int, torch.Tensor] = {}

    def coefficients(self, param):
        grad = self.grads.get(id(param))
        return None if grad is None else (self.compressor.decode(self.compressor.encode(grad)), self.compressor)


def test_dense_parameters_follow_plain_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = ProjectedAdamW([a], lr=0.01, eps=1e-12)
    theirs = torch.optim.AdamW([b], lr=0.01, eps=1e-12, weight_decay=0.0)
    for step in range(4):
        a.grad = b.grad = torch.randn(5, generator=torch.Generator().manual_seed(step))
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_state_dict_round_trips_and_continues_identically():
    spec = CompressionSpec(basis="seeded", rank=2, refresh_every=100, error_feedback=False, dense_threshold=1)
    compressor = build_compressor(spec, torch.Size((12, 6)), 0, 0)
    compressor.begin_step(0)
    weights = [torch.nn.Parameter(torch.ones(12, 6)) for _ in range(2)]
    sources = [Projections(compressor) for _ in range(2)]
    first = ProjectedAdamW([weights[0]], lr=0.01, source=sources[0])
    for step in range(3):
        sources[0].grads[id(weights[0])] = gradients(step, (12, 6))
        first.step()
    weights[1].data.copy_(weights[0].data)
    second = ProjectedAdamW([weights[1]], lr=0.01, source=sources[1])
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as if through a checkpoint file
    for optimizer, weight, source in zip((first, second), weights, sources):
        source.grads[id(weight)] = gradients(9, (12, 6))
        optimizer.step()
    assert torch.equal(weights[0], weights[1])
    assert first.state[weights[0]]["exp_avg"].shape == (2, 6)


def test_invalid_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="invalid ProjectedAdamW hyper-parameters"):
        ProjectedAdamW([torch.nn.Parameter(torch.zeros(2))], lr=-1)


def orthonormal(rows: int, rank: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, rank, generator=torch.Generator().manual_seed(seed)))[0]


def seeded_refresh_setup(policy: str, refresh_every: int = 1):
    """A (12 x 6) weight whose seeded rank-2 basis is redrawn every ``refresh_every`` steps."""
    spec = CompressionSpec(basis="seeded", rank=2, refresh_every=refresh_every, error_feedback=False, dense_threshold=1)
    compressor = build_compressor(spec, torch.Size((12, 6)), 0, 0)
    weight = torch.nn.Parameter(torch.ones(12, 6))
    source = Projections(compressor)
    optimizer = ProjectedAdamW([weight], lr=0.01, betas=BETAS, source=source, refresh_moments=policy)
    return compressor, weight, source, optimizer


def first_two_steps(policy: str) -> tuple[dict, dict, torch.Tensor]:
    """Optimizer state after a step in basis P0, and after a zero-gradient step in basis P1."""
    compressor, weight, source, optimizer = seeded_refresh_setup(policy)
    compressor.begin_step(0)
    old_basis = compressor.basis_matrix()
    source.grads[id(weight)] = gradients(0, (12, 6))
    optimizer.step()
    before = copy.deepcopy(optimizer.state[weight])
    compressor.begin_step(1)
    source.grads[id(weight)] = torch.zeros(12, 6)
    optimizer.step()
    transfer = compressor.basis_matrix().t() @ old_basis
    return before, optimizer.state[weight], transfer


def test_reproject_carries_the_moments_into_the_new_basis():
    before, after, transfer = first_two_steps("reproject")
    assert torch.allclose(after["exp_avg"], BETAS[0] * transfer @ before["exp_avg"], atol=1e-7)
    assert torch.allclose(after["exp_avg_sq"], BETAS[1] * transfer.square() @ before["exp_avg_sq"], atol=1e-9)
    assert after["step"].item() == 2


def test_reset_zeroes_the_moments_and_restarts_bias_correction():
    _, after, _ = first_two_steps("reset")
    assert torch.count_nonzero(after["exp_avg"]) == 0 and torch.count_nonzero(after["exp_avg_sq"]) == 0
    assert after["step"].item() == 1


def test_keep_leaves_the_moments_and_stores_no_basis():
    before, after, _ = first_two_steps("keep")
    assert torch.allclose(after["exp_avg"], BETAS[0] * before["exp_avg"])
    assert "basis" not in after


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(4, 24), rank=st.integers(1, 3))
def test_reprojected_moment_is_the_old_moment_seen_from_the_new_basis(seed, rows, rank):
    old, new = orthonormal(rows, rank, seed), orthonormal(rows, rank, seed + 1)
    moments = torch.randn(rank, 5, generator=torch.Generator().manual_seed(seed + 2))
    state = {"basis": old, "exp_avg": moments.clone(), "exp_avg_sq": moments.square(), "step": torch.tensor(3.0)}
    follow_basis(state, new, "reproject")
    assert torch.allclose(state["exp_avg"], new.t() @ (old @ moments), atol=1e-5)  # P_new^T of the full-size moment
    assert bool((state["exp_avg_sq"] >= 0).all())
    assert torch.equal(state["basis"], new)


@given(seed=st.integers(0, 2**16), policy=st.sampled_from(["reproject", "reset"]))
def test_an_unchanged_basis_leaves_the_moments_alone(seed, policy):
    basis = orthonormal(8, 2, seed)
    moments = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
    state = {"basis": basis.clone(), "exp_avg": moments.clone(), "exp_avg_sq": moments.square(), "step": torch.tensor(3.0)}
    follow_basis(state, basis, policy)
    assert torch.equal(state["exp_avg"], moments) and state["step"].item() == 3


def test_reprojected_state_round_trips_through_a_checkpoint():
    runs = [seeded_refresh_setup("reproject", refresh_every=2) for _ in range(2)]
    (compressor, weight, source, first), (_, twin, twin_source, second) = runs
    twin_source.compressor = compressor  # one basis schedule for both
    for step in range(3):
        compressor.begin_step(step)
        source.grads[id(weight)] = gradients(step, (12, 6))
        first.step()
    twin.data.copy_(weight.data)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    compressor.begin_step(4)  # a new basis: the loaded basis decides the transfer
    for optimizer, param, grads in ((first, weight, source), (second, twin, twin_source)):
        grads.grads[id(param)] = gradients(4, (12, 6))
        optimizer.step()
    assert torch.equal(weight, twin)


def test_unknown_refresh_policy_is_refused():
    with pytest.raises(ValueError, match="unknown refresh_moments 'forget'"):
        ProjectedAdamW([torch.nn.Parameter(torch.zeros(2))], refresh_moments="forget")


@pytest.mark.parametrize(("method", "lr"), [("svd-projected-reproject", 3e-3), ("svd-projected-reset", 3e-3), ("flora-int8-r8", 3e-2)])
def test_replicas_stay_identical_across_refreshes_and_loss_falls(method, lr):
    overrides = {"method": method, "steps": 12, "refresh_every": 3, "eval_every": 4, "digest_every": 100, "optim": replace(TINY_OPTIM, lr=lr)}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss - 0.2

"""Shared-seed zeroth-order steps: the one-byte quantiser, perturb and restore, and a real two-client run."""

import math

import pytest
import torch
from distributed import run_workers
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from disttrain.federated import zeroth_order as zo
from disttrain.federated.zeroth_order import (
    BYTES_PER_STEP,
    ZOConfig,
    ZOState,
    apply_update_,
    dequantize,
    direction,
    projected_gradient,
    quantize,
    rounding_offset,
    zo_step,
)
from disttrain.train.replica import check_replicas

clips = st.floats(1e-3, 1e3)
unit_fractions = st.floats(0.0, 1.0, exclude_max=True)
distributions = st.sampled_from(["gaussian", "rademacher"])


def within_clip(clip: float):
    return st.floats(-1.0, 1.0).map(lambda fraction: fraction * clip)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def whole_direction(seed: int, step: int, rank: int, numel: int, config: ZOConfig) -> torch.Tensor:
    """Client ``rank``'s z for a whole 1-D parameter (id 0), chunk after chunk."""
    bounds = range(0, numel, config.chunk_numel)
    like = [torch.empty(min(config.chunk_numel, numel - start)) for start in bounds]
    parts = [direction(seed, step, rank, 0, chunk, part, config.distribution) for chunk, part in enumerate(like)]
    return torch.cat(parts)


@given(clips.flatmap(lambda clip: st.tuples(st.just(clip), within_clip(clip))))
def test_nearest_rounding_round_trips_within_half_a_code(case):
    clip, g = case
    assert abs(dequantize(quantize(g, clip), clip) - g) <= clip / 127 / 2 * (1 + 1e-9)


@given(clips.flatmap(lambda clip: st.tuples(st.just(clip), within_clip(clip))), unit_fractions)
def test_stochastic_rounding_round_trips_within_one_code(case, offset):
    clip, g = case
    assert abs(dequantize(quantize(g, clip, offset), clip) - g) < clip / 127 * (1 + 1e-9)


@given(clips, st.floats(1.0, 1e6), st.sampled_from([-1, 1]), unit_fractions)
def test_quantiser_saturates_at_the_clip(clip, excess, sign, offset):
    assert quantize(sign * clip * excess, clip, offset) == sign * 127


def test_quantiser_saturates_at_the_negative_clip_whatever_the_rounding_offset():
    assert quantize(-1.0, 1.0, 0.9999999999999999) == -127  # floor(-127 + 0.99999...) is -126 in floating point


@pytest.mark.parametrize("g", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_sends_zero(g):
    assert quantize(g, 1.0) == 0


def test_stochastic_rounding_is_unbiased():
    clip, g = 127.0, 0.3  # codes are 1.0 apart: g sits 30% of the way from code 0 to code 1
    codes = [quantize(g, clip, rounding_offset(7, step, 0, "stochastic")) for step in range(2000)]
    assert abs(sum(codes) / len(codes) - g) < 0.03


@given(st.integers(0, 2**40), st.integers(0, 10**6), st.integers(0, 63), distributions)
def test_perturb_and_restore_leaves_weights_bit_identical(seed, step, rank, distribution):
    model = tiny_mlp()
    before = snapshot(model)
    config = ZOConfig(eps=0.1, distribution=distribution, chunk_numel=6)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    g, _ = projected_gradient(list(model.parameters()), lambda: float(model(x).sum()), seed, step, rank, config)
    assert g != 0  # the evaluations did see perturbed weights
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@given(distributions)
def test_projected_gradient_of_a_linear_loss_is_its_slope_along_z(distribution):
    weight = torch.zeros(10, 3)
    c = torch.randn(10, 3, generator=torch.Generator().manual_seed(2))
    config = ZOConfig(eps=1e-2, distribution=distribution, chunk_numel=8)
    g, _ = projected_gradient([weight], lambda: float((c * weight).sum()), 5, 1, 0, config)
    assert g == pytest.approx(float(c.view(-1) @ whole_direction(5, 1, 0, 30, config)), rel=1e-4)


def test_dropout_draws_the_same_masks_in_both_evaluations():
    dropout = nn.Dropout(0.5)
    g, _ = projected_gradient([torch.zeros(4)], lambda: float(dropout(torch.ones(100)).sum()), 0, 0, 0, ZOConfig())
    assert g == 0


def test_update_moves_weights_by_the_mean_of_every_clients_scaled_direction():
    weight = torch.zeros(12)
    config = ZOConfig(lr=0.5, clip=127.0, chunk_numel=5)
    apply_update_([weight], [3, 0, -8], seed=4, step=9, config=config)
    expected = torch.zeros(12)
    for rank, g in [(0, 3.0), (2, -8.0)]:
        expected -= 0.5 * g * whole_direction(4, 9, rank, 12, config) / 3
    assert torch.allclose(weight, expected)


def test_a_lone_client_sends_nothing():
    model = tiny_mlp()
    state = ZOState(ZOConfig(), seed=0)
    result = zo_step(model, lambda m, x: m(x).square().mean(), torch.ones(2, 5), state)
    assert result.bytes_sent == 0 and state.step == 1


def _regression_batch(generator: torch.Generator, w_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, w_true.numel(), generator=generator)
    return x, x @ w_true + 0.01 * torch.randn(32, generator=generator)


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x).squeeze(-1) - y).square().mean()


def _train_linear_regression(rank: int, world_size: int, steps: int) -> dict:
    """Each client fits the same regression on its own data stream; counts what it puts into collectives."""
    sent = []

    def counting_all_gather(output, payload, **kwargs):
        sent.append(payload.numel() * payload.element_size())
        return all_gather(output, payload, **kwargs)

    all_gather, zo.all_gather_flat = zo.all_gather_flat, counting_all_gather
    w_true = torch.linspace(-2.0, 2.0, 8)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    data = torch.Generator().manual_seed(100 + rank)
    state = ZOState(ZOConfig(eps=1e-3, lr=0.02, clip=32.0, chunk_numel=4), seed=1234)
    results = [zo_step(model, _mse, _regression_batch(data, w_true), state) for _ in range(steps)]
    return {
        "losses": [r.loss for r in results],
        "bytes_sent": [r.bytes_sent for r in results],
        "collective_bytes": sent,
        "identical": check_replicas(model),
    }


def test_two_clients_reduce_the_loss_and_stay_bit_identical_sending_one_byte_per_step():
    steps = 200
    for outcome in run_workers(_train_linear_regression, 2, steps, timeout_s=120):
        losses = outcome["losses"]
        assert sum(losses[-20:]) < 0.05 * sum(losses[:20])
        assert outcome["identical"]
        assert outcome["bytes_sent"] == [BYTES_PER_STEP] * steps == [1] * steps
        assert outcome["collective_bytes"][:steps] == [1] * steps  # then the replica check's digest

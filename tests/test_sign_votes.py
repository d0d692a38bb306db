"""Sign votes: Lion's sign on a seeded rotating share of the coordinates, one bit each, state exact."""

from dataclasses import replace

import pytest
import torch
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import train_and_digest
from tiny import TINY_OPTIM

from disttrain.compress.sign_votes import SignVotes

shapes = st.tuples(st.integers(1, 30), st.integers(1, 30))
BETAS = (0.9, 0.99)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 7), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_votes_are_the_sign_of_lions_blend_at_the_scheduled_coordinates(shape, every, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    compressor = SignVotes(torch.Size(shape), every, *BETAS, seed=seed, param_id=1)
    momentum = torch.zeros(shape)
    for step in range(steps):
        grad = torch.randn(shape, generator=generator)
        compressor.begin_step(step)
        votes = compressor.decode(compressor.encode(grad)).reshape(-1)
        compressor.commit()
        scheduled = torch.arange(compressor.phase, votes.numel(), compressor.every)
        blend = (BETAS[0] * momentum + (1 - BETAS[0]) * grad).reshape(-1)
        assert torch.equal(votes[scheduled], torch.sign(blend[scheduled]))
        others = torch.ones(votes.numel(), dtype=torch.bool)
        others[scheduled] = False
        assert torch.count_nonzero(votes[others]) == 0
        momentum = BETAS[1] * momentum + (1 - BETAS[1]) * grad
        assert torch.allclose(compressor.momentum.reshape(shape), momentum, atol=1e-6)


@given(st.integers(1, 9), st.integers(0, 2**31 - 1), st.integers(0, 50))
def test_each_coordinate_is_voted_once_per_cycle(every, seed, cycle):
    compressor = SignVotes(torch.Size((10, 10)), every, *BETAS, seed=seed, param_id=0)
    counts = torch.zeros(100)
    for step in range(cycle * every, (cycle + 1) * every):
        compressor.begin_step(step)
        counts[compressor._positions(torch.device("cpu"))] += 1
    assert torch.equal(counts, torch.ones(100))


def test_one_bit_per_voted_value_and_no_positions_on_the_wire():
    compressor = SignVotes(torch.Size((64, 40)), 5, *BETAS, seed=0, param_id=0)
    assert compressor.wire_bytes() == 64 * 40 // 5 // 8  # 160x fewer bytes than fp32


def test_a_zero_blend_votes_both_ways_instead_of_drifting_up():
    compressor = SignVotes(torch.Size((8, 8)), 1, *BETAS, seed=0, param_id=0)
    compressor.begin_step(0)
    votes = compressor.decode(compressor.encode(torch.zeros(8, 8)))
    assert votes.sum() == 0 and torch.count_nonzero(votes) == 64


@pytest.mark.parametrize(("every", "betas", "message"), [(0, BETAS, "every must be >= 1"), (5, (0.9, 1.5), "Lion betas")])
def test_bad_settings_are_refused_by_name(every, betas, message):
    with pytest.raises(ValueError, match=message):
        SignVotes(torch.Size((4, 4)), every, *betas, seed=0, param_id=0)


def test_replicas_stay_identical_and_loss_falls():
    overrides = {"method": "sign-votes-1in5", "steps": 12, "eval_every": 4, "digest_every": 100, "optim": replace(TINY_OPTIM, lr=1e-2)}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss - 0.2

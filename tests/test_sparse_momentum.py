"""Sparse momentum (DeMo-style): votes at the momentum's largest entries, the rest kept, state exact."""

from dataclasses import replace

import pytest
import torch
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import train_and_digest
from tiny import TINY_OPTIM

from disttrain.compress.sparse_momentum import CHUNK, SparseMomentum

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


def chunked(flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``flat`` cut into the compressor's chunks, the last one padded with ``fill``."""
    chunk = min(CHUNK, flat.numel())
    padded = torch.full((-(-flat.numel() // chunk) * chunk,), fill)
    padded[: flat.numel()] = flat
    return padded.view(-1, chunk)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 6), st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_votes_sit_at_the_largest_momentum_entries_and_the_rest_is_kept(shape, per_chunk, decay, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    compressor = SparseMomentum(torch.Size(shape), per_chunk, decay)
    kept = torch.zeros(shape)
    for _ in range(steps):
        grad = torch.randn(shape, generator=generator)
        momentum = decay * kept + grad
        votes = compressor.decode(compressor.encode(grad))
        compressor.commit()
        sent = votes != 0
        # per chunk: the votes are the k largest |momentum| entries, with their signs
        picked = chunked(sent.reshape(-1).float()).sum(dim=1)
        assert torch.all(picked <= min(per_chunk, chunked(momentum.reshape(-1)).shape[1]))
        smallest_sent = chunked(torch.where(sent, momentum.abs(), torch.inf).reshape(-1), torch.inf).amin(dim=1)
        largest_kept = chunked(torch.where(sent, -torch.inf, momentum.abs()).reshape(-1), -torch.inf).amax(dim=1)
        assert torch.all(largest_kept <= smallest_sent)
        assert torch.equal(votes[sent], momentum[sent].sign())
        # what was sent left the momentum; everything else stayed
        kept = torch.where(sent, torch.zeros(()), momentum)
        assert torch.allclose(compressor.momentum.reshape(shape), kept)


def test_wire_is_one_byte_per_position_and_two_bits_per_sign():
    compressor = SparseMomentum(torch.Size((256, 1024)), 4, 0.9)
    picks = 1024 * 4
    assert compressor.wire_bytes() == picks + picks // 4
    assert 256 * 1024 * 4 / compressor.wire_bytes() == pytest.approx(204.8)


def test_a_zero_momentum_entry_sends_no_vote():
    compressor = SparseMomentum(torch.Size((3,)), 2, 0.9)
    assert torch.equal(compressor.decode(compressor.encode(torch.tensor([0.0, 0.0, 5.0]))), torch.tensor([0.0, 0.0, 1.0]))


def test_workers_hold_bit_identical_parameters_after_sparse_momentum_steps():
    results = run_workers(train_and_digest, 3, {"method": "sparse-momentum-k4", "steps": 6, "digest_every": 2})
    assert len({r["digest"] for r in results}) == 1
    assert all(r["summary"].replicas_identical for r in results)


def test_validation_loss_falls_with_sparse_momentum_at_its_own_lr():
    overrides = {"method": "sparse-momentum-k4", "steps": 12, "eval_every": 3, "optim": replace(TINY_OPTIM, lr=None)}
    summary = run_workers(train_and_digest, 2, overrides)[0]["summary"]
    assert summary.history[-1].val_loss < summary.history[0].val_loss - 0.2

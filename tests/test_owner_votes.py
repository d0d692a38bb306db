"""Sparse votes summed by chunk owners (all_to_all, then all_gather) across real processes over Gloo."""

import copy

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers

from disttrain.comm import CompressedAllReduce
from disttrain.comm.ddp_hook import DisttrainHookState
from disttrain.compress import CompressionSpec

SHAPES = [(64, 40), (300,), (3,), (17, 9)]  # whole chunks, a partial last chunk, chunks shorter than 256


def spec(reduction: str, keep: int = 8) -> CompressionSpec:
    return CompressionSpec(basis="sparse_momentum", error_feedback=False, per_chunk=4, vote_reduction=reduction, owner_keep=keep)


def vote_means(rank: int, world: int, reduction: str, keep: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """This worker's decoded mean votes, every worker's own (unreduced) votes, and the wire bytes counted."""
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    reducer = CompressedAllReduce(params, spec(reduction, keep), seed=0, overlap=False)
    generator = torch.Generator().manual_seed(rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    own = [c.decode(c.encode(p.grad)) for c, p in zip(reducer.compressors, params)]
    reducer.start_step(0)
    reducer.finish()
    reducer.write_gradients()
    flat_own = torch.cat([v.reshape(-1) for v in own])
    everyone = [torch.zeros_like(flat_own) for _ in range(world)]
    dist.all_gather(everyone, flat_own)
    return [p.grad.clone() for p in params], everyone, reducer.wire_bytes_last_step


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_owners_keeping_every_position_give_exactly_the_all_gather_mean(world):
    gathered = run_workers(vote_means, world, "all_gather", 8)
    owned = run_workers(vote_means, world, "owners", 256)
    for (by_owners, _, _), (by_gather, _, _) in zip(owned, gathered):
        for a, b in zip(by_owners, by_gather):
            assert torch.equal(a, b)


def test_owners_keep_the_positions_of_largest_vote_count_in_every_chunk():
    results = run_workers(vote_means, 3, "owners", 2)
    means, everyone, _ = results[0]
    exact = torch.stack(everyone).mean(0)
    kept = torch.cat([m.reshape(-1) for m in means])
    offset = 0
    for shape in SHAPES:
        numel = torch.Size(shape).numel()
        for lo in range(0, numel, 256):
            chunk_exact = exact[offset + lo : offset + min(lo + 256, numel)]
            chunk_kept = kept[offset + lo : offset + min(lo + 256, numel)]
            nonzero = chunk_kept != 0
            assert int(nonzero.sum()) <= 2
            assert torch.equal(chunk_kept[nonzero], chunk_exact[nonzero])  # a kept position holds the exact mean
            weakest_kept = chunk_kept[nonzero].abs().min() if nonzero.any() else torch.tensor(0.0)
            assert chunk_exact[~nonzero].abs().max() <= weakest_kept or int(nonzero.sum()) == min(2, chunk_exact.numel())
        offset += numel


def votes_applied_and_owed(rank: int, world: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over ``rounds`` exchanges keeping 1 position per chunk: the summed votes every worker sent, the
    summed counts applied, and the counts the owners still owe (gathered), all as flat chunk rows."""
    params = [torch.nn.Parameter(torch.zeros(64, 40))]
    reducer = CompressedAllReduce(params, spec("owners", keep=1), seed=0, overlap=False)
    generator = torch.Generator().manual_seed(rank)
    sent = torch.zeros(64 * 40)
    applied = torch.zeros(64 * 40)
    for step in range(rounds):
        params[0].grad = torch.randn(64, 40, generator=generator)
        twin = copy.deepcopy(reducer.compressors[0])  # encodes what this worker's exchange is about to send
        sent += twin.decode(twin.encode(params[0].grad)).reshape(-1)
        reducer.start_step(step)
        reducer.finish()
        reducer.write_gradients()
        applied += params[0].grad.reshape(-1) * world
        reducer.commit()
    everyone = [torch.zeros_like(sent) for _ in range(world)]
    dist.all_gather(everyone, sent)
    owed = reducer.buckets[0].residual
    owed_everywhere = [torch.zeros_like(owed) for _ in range(world)]
    dist.all_gather(owed_everywhere, owed)
    return torch.stack(everyone).sum(0), applied, torch.cat(owed_everywhere).reshape(-1)[: 64 * 40]


def test_a_vote_an_owner_did_not_send_is_owed_until_a_later_round_sends_it():
    """Nothing is lost: what every worker voted equals what was applied plus what the owners still owe."""
    for sent, applied, owed in run_workers(votes_applied_and_owed, 2, 3):
        assert torch.equal(sent, applied + owed)
        assert owed.abs().sum() > 0


def test_every_worker_applies_the_same_owner_reduced_votes():
    results = run_workers(vote_means, 3, "owners", 4)
    for means, _, _ in results[1:]:
        for a, b in zip(means, results[0][0]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_wire_bytes_per_worker_stay_below_one_vote_and_one_kept_payload_however_many_workers():
    """All_gather's bytes grow with W - 1; the owners' stay below one payload of votes (5 bytes a chunk at
    4 votes) plus one of kept pairs (6 bytes a chunk at 4 kept), give or take the chunks that pad the ranges."""
    chunks = sum(-(-torch.Size(shape).numel() // 256) for shape in SHAPES)
    gathered = {world: run_workers(vote_means, world, "all_gather", 8)[0][2] for world in (2, 4)}
    assert gathered[4] == 3 * gathered[2]
    for world in (2, 4):
        assert run_workers(vote_means, world, "owners", 4)[0][2] <= (chunks + world - 1) * (5 + 6)


def test_owner_reduction_is_refused_for_payloads_that_are_not_sparse_votes():
    with pytest.raises(ValueError, match="basis='sparse_momentum'"):
        CompressionSpec(basis="seeded", vote_reduction="owners").validate()


def test_owner_reduction_is_refused_in_a_ddp_comm_hook():
    with pytest.raises(ValueError, match="DDP comm hook"):
        DisttrainHookState([torch.nn.Parameter(torch.zeros(4, 4))], spec("owners"))

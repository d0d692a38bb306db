"""Local-step rounds (DiLoCo): replicas agree at every round end, bytes move only there, resume is exact."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import interrupted_and_resumed, train_and_digest
from tiny import tiny_config

from disttrain.compress.factory import CompressionSpec, build_compressor
from disttrain.data.corpus import ByteCorpus
from disttrain.methods import get_method
from disttrain.models.gpt import GPT
from disttrain.train.config import TrainConfig
from disttrain.optim.local_subspace import LocalSubspace
from disttrain.optim.projected_adamw import ProjectedAdamW
from disttrain.exchange.base import ExchangeOptions
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.train.optimizer import build_optimizer
from disttrain.train.replica import tensors_digest

DILOCO_METHODS = [
    "diloco-h10", "diloco-int8-h30", "diloco-int1-h40", "diloco-sparse-k4-h5", "diloco-svd-int8-h10", "fedavg-subspace-int8-h10",
    # Compositions of parts the default set checks on their own (subspace local steps, votes, sign votes).
    pytest.param("fedavg-subspace-votes-k1-h13", marks=pytest.mark.slow), pytest.param("fedavg-sign-1in32-h10", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method", DILOCO_METHODS)
def test_workers_hold_bit_identical_parameters_after_local_step_rounds(method):
    results = run_workers(train_and_digest, 3, {"method": method, "steps": 7, "local_steps": 3, "digest_every": 2})
    assert len({r["digest"] for r in results}) == 1
    assert all(r["summary"].replicas_identical for r in results)


@pytest.mark.parametrize("method", ["diloco-int8-h30", "diloco-int1-h40", "diloco-sparse-k4-h5", "fedavg-subspace-int8-h10"])
def test_validation_loss_falls_with_local_step_rounds(method):
    overrides = {"method": method, "steps": 24, "local_steps": 4, "eval_every": 4}
    summary = run_workers(train_and_digest, 2, overrides)[0]["summary"]
    assert summary.history[-1].val_loss < summary.history[0].val_loss - 0.2


def test_bytes_move_only_at_round_ends():
    overrides = {"method": "diloco-h10", "steps": 9, "local_steps": 3, "eval_every": 100}
    summary = run_workers(train_and_digest, 2, overrides)[0]["summary"]
    # three rounds of one fp32 pseudo-gradient each, spread over nine steps
    assert summary.total_bytes == 3 * summary.dense_bytes_per_step
    assert summary.bytes_per_step == pytest.approx(summary.dense_bytes_per_step / 3)


def test_evaluation_waits_for_the_round_end():
    overrides = {"method": "diloco-h10", "steps": 8, "local_steps": 4, "eval_every": 3}
    summary = run_workers(train_and_digest, 2, overrides)[0]["summary"]
    assert [point.step for point in summary.history] == [4, 8]


@pytest.mark.parametrize(
    "method", ["diloco-int8-h30", "diloco-sparse-k4-h5", "diloco-sparse-k4-h5-lean-bf16-start", "fedavg-subspace-int8-h10"]
)
def test_a_resumed_local_step_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, method):
    # stopped mid-round after step 5; the last round end, and checkpoint, was step 4
    rounds_of_two = {"method": method, "local_steps": 2}
    for straight, resumed, start in run_workers(interrupted_and_resumed, 2, str(tmp_path), rounds_of_two):
        assert start == 4
        assert straight == resumed


def test_local_steps_on_a_per_step_method_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--local-steps does not apply to 'svd-int8-reconstruct': it exchanges every step.*diloco"):
        TrainConfig(method="svd-int8-reconstruct", local_steps=4).validate()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_dense_int8_payload_is_within_half_a_step_of_each_row(rows, cols, scale, seed):
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    spec = CompressionSpec(basis="dense", payload="int8", error_feedback=False)
    compressor = build_compressor(spec, grad.shape, 0, 0)
    assert compressor.wire_bytes() == rows * 4 + rows * cols
    step = grad.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((compressor.round_trip(grad) - grad).abs() <= step / 2 + 1e-6 * step)


def redo_with_a_joiner(rank: int, world: int) -> tuple[bytes, bytes]:
    """Rank 0 did a round whose exchange is pending; rank 1 joined with the round's start only."""
    config = tiny_config(method="diloco-h10", local_steps=2, steps=4)
    method = replace(get_method("diloco-h10"), local_steps=2)
    solos = [dist.new_group([r]) for r in range(world)]
    batch = ByteCorpus(config.data, config.seed).train_batch(0, 0, 1)

    def rounds(group) -> tuple[GPT, LocalRoundsExchange]:
        torch.manual_seed(0)
        model = GPT(config.model)
        options = ExchangeOptions(seed=config.seed, group=group, elastic=True)
        return model, LocalRoundsExchange(model, build_optimizer(model.parameters(), method, config), method, options)

    both, alone = rounds(None), rounds(solos[rank])
    if rank == 0:
        for model, exchange in (both, alone):
            model(*batch)[1].backward()
            exchange.step(0)  # the round's only local step before its end
            exchange.exchange_pending = True  # its exchange at step 1 failed; redo it
        alone[1].step(1)
    else:
        both[1].load_shared_state_dict({**both[1].shared_state_dict(), "pending": True, "in_sync": False})  # as a joiner receives it
    both[1].step(1)
    return tensors_digest(both[1].replica_parameters()), tensors_digest(alone[1].replica_parameters())


def test_a_redone_exchange_averages_over_the_workers_that_did_the_round():
    (after_0, alone_0), (after_1, _) = run_workers(redo_with_a_joiner, 2)
    assert after_0 == after_1 == alone_0


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(6, 40), cols=st.integers(6, 40), steps=st.integers(1, 4), round_index=st.integers(0, 1000))
def test_local_steps_in_a_subspace_move_each_projected_weight_only_within_the_rounds_basis(rows, cols, steps, round_index):
    weight = torch.nn.Parameter(torch.randn(rows, cols, generator=torch.Generator().manual_seed(round_index)))
    start = weight.detach().clone()
    spec = CompressionSpec(basis="seeded", rank=2, refresh_every=1, dense_threshold=1, error_feedback=False)
    subspace = LocalSubspace([weight], spec, seed=7)
    subspace.begin_round(round_index)
    optimizer = ProjectedAdamW([weight], lr=0.1, source=subspace)
    for _ in range(steps):
        weight.grad = torch.randn(rows, cols)
        optimizer.step()
    moved = (weight.detach() - start).double()
    exchange = build_compressor(spec, weight.shape, 0, 7)  # what the round's exchange projects on
    exchange.begin_step(round_index)
    reduced = exchange.basis.matrix().double()
    oriented = moved if rows >= cols else moved.T
    outside = oriented - reduced @ torch.linalg.lstsq(reduced, oriented).solution
    assert outside.norm() <= 1e-5 * max(1.0, oriented.norm())

"""CompressedAllReduce across real processes over Gloo."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers

from disttrain.comm import CollectiveFailed, CompressedAllReduce
from disttrain.compress import CompressionSpec

SHAPES = [(48, 24), (24, 40), (30,), (12, 12)]


def make_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]


def shared_subspace_gradients(rank: int, r: int) -> list[torch.Tensor]:
    """Gradients of rank r whose column (or row) space is the same on every worker."""
    common = torch.Generator().manual_seed(0)
    mine = torch.Generator().manual_seed(100 + rank)
    grads = []
    for shape in SHAPES:
        if len(shape) == 1:
            grads.append(torch.randn(shape, generator=mine))
        elif shape[0] >= shape[1]:
            grads.append(torch.randn(shape[0], r, generator=common) @ torch.randn(r, shape[1], generator=mine))
        else:
            grads.append(torch.randn(shape[0], r, generator=mine) @ torch.randn(r, shape[1], generator=common))
    return grads


def reduce_once(rank: int, world: int, spec: CompressionSpec, cap: int) -> tuple[list, list, int]:
    params = make_params()
    reducer = CompressedAllReduce(params, spec, seed=7, bucket_cap_bytes=cap, overlap=False)
    grads = shared_subspace_gradients(rank, 3)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    reducer.start_step(0)
    reducer.finish()
    reducer.write_gradients()
    everyone = [torch.zeros_like(torch.cat([g.reshape(-1) for g in grads])) for _ in range(world)]
    dist.all_gather(everyone, torch.cat([g.reshape(-1) for g in grads]))
    dense_mean = torch.stack(everyone).mean(0)
    return [p.grad.reshape(-1) for p in params], dense_mean, len(reducer.buckets)


@pytest.mark.parametrize("cap", [1 << 30, 64], ids=["one-bucket", "many-buckets"])
def test_svd_allreduce_of_rank_r_gradients_equals_the_dense_mean(cap):
    spec = CompressionSpec(basis="svd", rank=3, error_feedback=False, dense_threshold=100)
    for reduced, dense_mean, buckets in run_workers(reduce_once, 3, spec, cap):
        assert torch.allclose(torch.cat(reduced), dense_mean, atol=1e-4)
        assert buckets == (1 if cap > 1000 else len(SHAPES))


def test_dense_basis_allreduce_equals_the_dense_mean():
    spec = CompressionSpec(basis="dense")
    for reduced, dense_mean, _ in run_workers(reduce_once, 2, spec, 1 << 30):
        assert torch.allclose(torch.cat(reduced), dense_mean, atol=1e-6)


def test_int8_allreduce_is_close_to_the_dense_mean_and_identical_on_all_workers():
    spec = CompressionSpec(basis="svd", rank=3, payload="int8", error_feedback=False, dense_threshold=100)
    results = run_workers(reduce_once, 3, spec, 256)
    for reduced, dense_mean, _ in results:
        assert torch.allclose(torch.cat(reduced), dense_mean, atol=0.05 * dense_mean.abs().max().item())
    assert all(torch.equal(torch.cat(r[0]), torch.cat(results[0][0])) for r in results)


def overlapped_backward(rank: int, world: int) -> tuple[int, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    spec = CompressionSpec(basis="seeded", rank=4, payload="int8", dense_threshold=100)
    reducer = CompressedAllReduce(model.parameters(), spec, seed=1, bucket_cap_bytes=200, overlap=True)
    reducer.start_step(0)
    torch.manual_seed(rank)
    model(torch.randn(8, 32)).pow(2).mean().backward()
    launched_during_backward = reducer._next_launch
    reducer.finish()
    reducer.write_gradients()
    return launched_during_backward, [p.grad for p in model.parameters()]


def test_buckets_launch_during_backward_and_all_workers_agree():
    results = run_workers(overlapped_backward, 2)
    launched, grads0 = results[0]
    assert launched > 0  # the hooks launched buckets before finish()
    assert all(torch.equal(a, b) for a, b in zip(grads0, results[1][1]))


def payload_bytes(rank: int, world: int, spec: CompressionSpec) -> tuple[int, int]:
    params = make_params()
    reducer = CompressedAllReduce(params, spec, seed=0, overlap=False)
    for p in params:
        p.grad = torch.ones_like(p)
    reducer.start_step(1)
    reducer.finish()
    return reducer.payload_bytes_last_step, reducer.compressed_payload_bytes()


def test_payload_bytes_are_counted_per_step():
    spec = CompressionSpec(basis="seeded", rank=3, error_feedback=False, dense_threshold=200)
    counted, planned = run_workers(payload_bytes, 2, spec)[0]
    # (48,24) -> 3x24, (24,40) -> 3x24, (30,) dense, (12,12) below the threshold: dense
    assert counted == planned == 4 * (3 * 24 + 3 * 24 + 30 + 144)


def failing_peer(rank: int, world: int) -> dict:
    import os

    params = make_params()
    spec = CompressionSpec(basis="seeded", rank=3, dense_threshold=100)
    reducer = CompressedAllReduce(params, spec, seed=0, overlap=False)
    for p in params:
        p.grad = torch.ones_like(p)
    reducer.start_step(0)
    reducer.finish()
    reducer.commit()
    dist.barrier()
    if rank == 1:
        os._exit(0)  # the peer vanishes before the next collective
    before = [c.state_dict().get("residual") for c in reducer.compressors]
    reducer.start_step(1)
    with pytest.raises(CollectiveFailed, match="rolled back"):
        reducer.finish()
    after = [c.state_dict().get("residual") for c in reducer.compressors]
    return {"unchanged": all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before, after))}


def test_a_failed_collective_rolls_back_the_error_feedback_state():
    results = run_workers(failing_peer, 2, vanishing_ranks=(1,))
    assert results[0] == {"unchanged": True}


def test_rank_that_compresses_nothing_is_refused():
    params = [torch.nn.Parameter(torch.zeros(64, 16))]
    with pytest.raises(ValueError, match="rank 16 is >= min\\(m, n\\) of every weight matrix"):
        CompressedAllReduce(params, CompressionSpec(basis="seeded", rank=16, dense_threshold=1), seed=0)


def test_bf16_payloads_all_reduce_close_to_the_dense_mean():
    spec = CompressionSpec(basis="svd", rank=3, payload="bf16", error_feedback=False, dense_threshold=100)
    results = run_workers(reduce_once, 2, spec, 1 << 30)
    for reduced, dense_mean, _ in results:
        assert torch.allclose(torch.cat(reduced), dense_mean, atol=0.02 * dense_mean.abs().max().item())
    assert torch.equal(torch.cat(results[0][0]), torch.cat(results[1][0]))


def test_int8_is_kept_while_its_all_gather_moves_fewer_bytes_than_fp32_all_reduce():
    from disttrain.comm.allreduce import cheaper_payload

    spec = CompressionSpec(basis="seeded", rank=8, payload="int8", dense_threshold=1)
    shapes = [torch.Size((1024, 256))] * 4
    assert cheaper_payload(spec, shapes, 4).payload == "int8"  # 3 x 2.1 kB vs 1.5 x 8.2 kB
    assert cheaper_payload(spec, shapes, 16).payload == "fp32"  # 15 x 2.1 kB vs 1.9 x 8.2 kB

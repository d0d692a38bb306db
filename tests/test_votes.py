"""Vote payloads keep a momentum of their own: transactional, exact across a checkpoint, never shared."""

import pytest
import torch

from disttrain.compress import CompressionSpec
from disttrain.compress.sign_votes import SignVotes
from disttrain.compress.sparse_momentum import SparseMomentum

SHAPE = torch.Size((20, 30))
VOTE_COMPRESSORS = {
    "sparse_momentum": lambda dtype=torch.float32: SparseMomentum(SHAPE, 3, 0.9, dtype),
    "sign_votes": lambda dtype=torch.float32: SignVotes(SHAPE, 3, 0.9, 0.99, seed=4, param_id=2, momentum_dtype=dtype),
}


@pytest.mark.parametrize("make", VOTE_COMPRESSORS.values(), ids=VOTE_COMPRESSORS.keys())
def test_rollback_keeps_the_committed_momentum_and_state_round_trips(make):
    source = make()
    source.begin_step(0)
    source.encode(torch.randn(SHAPE))
    source.commit()
    committed = source.momentum.clone()
    source.encode(torch.randn(SHAPE))
    source.rollback()
    assert torch.equal(source.momentum, committed)
    restored = make()
    restored.load_state_dict(source.state_dict())
    grad = torch.randn(SHAPE)
    for compressor in (source, restored):
        compressor.begin_step(1)
    assert torch.equal(restored.encode(grad), source.encode(grad))
    assert source.shared_state_dict() == {}  # the momentum is this worker's own


@pytest.mark.parametrize("make", VOTE_COMPRESSORS.values(), ids=VOTE_COMPRESSORS.keys())
def test_a_bf16_momentum_is_the_fp32_one_rounded_and_round_trips_as_bf16(make):
    full, half = make(), make(torch.bfloat16)
    grad = torch.randn(SHAPE)
    for compressor in (full, half):
        compressor.begin_step(0)
    assert torch.equal(half.encode(grad), full.encode(grad))  # the first votes see only the gradient
    full.commit()
    half.commit()
    assert half.momentum.dtype == torch.bfloat16
    assert torch.equal(half.momentum, full.momentum.to(torch.bfloat16))
    restored = make(torch.bfloat16)
    restored.load_state_dict(half.state_dict())
    assert restored.momentum.dtype == torch.bfloat16 and torch.equal(restored.momentum, half.momentum)


def test_an_unknown_momentum_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown momentum_dtype 'fp16'"):
        CompressionSpec(basis="sparse_momentum", error_feedback=False, momentum_dtype="fp16").validate()


@pytest.mark.parametrize("basis", ["sparse_momentum", "sign_votes"])
@pytest.mark.parametrize("changes", [{"payload": "int8", "error_feedback": False}, {"error_feedback": True}])
def test_votes_with_a_quantised_payload_or_error_feedback_are_refused(basis, changes):
    with pytest.raises(ValueError, match=f"{basis} sends its own votes and keeps its own momentum"):
        CompressionSpec(basis=basis, **changes).validate()

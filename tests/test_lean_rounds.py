"""The lean variants of the default: AdamW's memory or less, replicas still identical, rounds still exact."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers
from disttrain.launcher.local import free_port
from test_training import train_and_digest

from disttrain.methods import get_method
from disttrain.train.outer import OuterStep

LEAN = "diloco-sparse-k4-h5-lean"
HALF_START = "diloco-sparse-k4-h5-lean-bf16-start"


@pytest.mark.parametrize("method", [LEAN, HALF_START])
def test_a_lean_method_trains_workers_to_identical_replicas_with_a_falling_loss(method):
    results = run_workers(train_and_digest, 2, {"method": method, "steps": 20, "eval_every": 5, "digest_every": 5})
    assert len({r["digest"] for r in results}) == 1
    summary = results[0]["summary"]
    assert summary.replicas_identical
    assert summary.history[-1].val_loss < summary.history[0].val_loss - 0.2


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def one_process_outer_step(method_name: str, **changes) -> tuple[torch.nn.Module, OuterStep]:
    """A small model and the outer step of ``method_name`` (with ``changes``) over it, in a world of one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    method = replace(get_method(method_name), **changes)
    return model, OuterStep(list(model.parameters()), method, seed=3, peak_lr=1e-3)


def test_a_bf16_start_keeps_matrices_in_bf16_and_vectors_in_fp32_and_the_model_starts_there(one_process_group):
    model, outer = one_process_outer_step(HALF_START)
    assert [start.dtype for start in outer.global_params] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)  # a round of local progress
        outer.apply(inner_lr=1e-3)
        for p, start in zip(model.parameters(), outer.global_params):
            assert torch.equal(p.detach(), start.float())  # the next round starts exactly at the kept start


def test_a_bf16_start_with_outer_momentum_is_refused_with_the_fix(one_process_group):
    with pytest.raises(ValueError, match="plain outer SGD step"):
        one_process_outer_step(HALF_START, outer_momentum=0.9)

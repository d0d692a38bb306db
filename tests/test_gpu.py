"""The CUDA path: every recommended method training on a GPU, over Gloo when workers share one and
over NCCL when each has its own, with replicas compared by digest. Collected everywhere, run only
where torch sees a GPU (`pytest -m gpu`); the compiled kernels are test_kernels.py's cases."""

from __future__ import annotations

import pytest
import torch
from distributed import run_workers
from tiny import tiny_config

from disttrain.kernels import dispatch
from disttrain.method_listing import RECOMMENDED
from disttrain.methods import DEFAULT_METHOD
from disttrain.train.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def train_on_cuda(rank: int, world: int, methods: list[str]) -> dict[str, dict]:
    """Each method in turn, 26 bf16 steps (two rounds of the longest) on this process's GPU; its digest and where the weights live."""
    results = {}
    for method in methods:
        trainer = Trainer(tiny_config(method=method, steps=26, eval_every=13, device="cuda", precision="bf16"), progress=False)
        summary = trainer.run()
        results[method] = {
            "digest": summary.parameter_digest, "identical": summary.replicas_identical,
            "devices": {p.device.type for p in trainer.model.parameters()}, "losses": [p.val_loss for p in summary.history],
        }
    return results


def test_every_recommended_method_trains_on_one_shared_gpu_with_identical_replicas():
    """Two workers on the one GPU: Gloo carries their CUDA tensors."""
    first, second = run_workers(train_on_cuda, 2, list(RECOMMENDED), timeout_s=600)
    for method in RECOMMENDED:
        assert first[method]["devices"] == {"cuda"}, method
        assert first[method]["digest"] == second[method]["digest"], method
        assert first[method]["identical"] and second[method]["identical"], method
        assert first[method]["losses"][-1] < first[method]["losses"][0], method


def test_the_default_trains_on_nccl_with_a_gpu_of_its_own():
    (result,) = run_workers(train_on_cuda, 1, [DEFAULT_METHOD], backend="nccl", timeout_s=300)
    assert result[DEFAULT_METHOD]["devices"] == {"cuda"} and result[DEFAULT_METHOD]["identical"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two workers needs two GPUs")
def test_two_workers_on_nccl_hold_identical_replicas():
    first, second = run_workers(train_on_cuda, 2, [DEFAULT_METHOD], backend="nccl", per_node=2, timeout_s=300)
    assert first[DEFAULT_METHOD]["digest"] == second[DEFAULT_METHOD]["digest"]


def test_cuda_tensors_take_the_triton_kernels_by_default():
    assert dispatch.use_triton(torch.device("cuda"))

"""Device and precision choices: bf16 autocast trains with identical replicas, and impossible
device/backend combinations are named with their fix. (The CUDA/NCCL path itself needs a GPU.)"""

import pytest
import torch
from distributed import run_workers
from test_training import train_and_digest

from disttrain.comm.device import resolve_device
from disttrain.launcher.worker import resolve_backend
from disttrain.train.config import TrainConfig


def test_bf16_autocast_training_keeps_replicas_identical_and_learns():
    overrides = {"method": "svd-int8-reconstruct", "precision": "bf16", "steps": 10, "eval_every": 5}
    results = run_workers(train_and_digest, 2, overrides)
    assert len({r["digest"] for r in results}) == 1
    history = results[0]["summary"].history
    assert history[-1].val_loss < history[0].val_loss


def test_auto_backend_is_gloo_for_cpu_training():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"


def test_auto_backend_is_nccl_for_gpu_training_with_a_gpu_per_worker(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_backend("auto", torch.device("cuda", 0), local_workers=2) == "nccl"


def test_auto_backend_is_gloo_when_workers_share_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_backend("auto", torch.device("cuda", 0), local_workers=4) == "gloo"


def test_nccl_for_cpu_tensors_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--backend nccl moves CUDA tensors only.*--device cuda"):
        resolve_backend("nccl", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ValueError, match="torch sees no CUDA GPU: use --device cpu"):
        resolve_device("cuda")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16").validate()

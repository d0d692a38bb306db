"""disttrain.wrap with a per-step method: any torch model and optimizer, two real processes over Gloo."""

import copy

import pytest
import torch
from distributed import run_workers
from torch import nn

import disttrain
from disttrain.compress import CompressionSpec
from disttrain import Session

METHOD = "svd-int8-reconstruct"


def net(seed: int) -> nn.Sequential:
    """A frozen input layer, then an MLP with 512-wide 2-D weights."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 64)
    )
    model[0].requires_grad_(False)
    return model


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 * step + rank))
    with torch.no_grad():
        return x, 10 * net(0)(x)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def train(model: nn.Module, dt: Session, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_of(model, rank, step)
        dt.backward(loss)
        dt.step()
        dt.zero_grad()
        losses.append(loss.item())
    return losses


def wrapped(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Session]:
    model = net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    return model, optimizer, disttrain.wrap(model, optimizer, METHOD)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def training_and_resume(rank: int, world: int) -> dict:
    """Train 12 steps, checkpoint after 8; a fresh model resumed from it must end bit-identical."""
    model, optimizer, dt = wrapped(seed=1 + rank)
    frozen_start = model[0].weight.detach().clone()
    losses = train(model, dt, rank, range(8))
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict())), copy.deepcopy(dt.state_dict())
    losses += train(model, dt, rank, range(8, 12))
    resumed, resumed_optimizer, resumed_dt = wrapped(seed=100 + rank)
    resumed.load_state_dict(checkpoint[0][0])
    resumed_optimizer.load_state_dict(checkpoint[0][1])
    resumed_dt.load_state_dict(checkpoint[1])
    train(resumed, resumed_dt, rank, range(8, 12))
    return {
        "losses": losses,
        "parameters": flat_parameters(model),
        "replicas_identical": dt.check_replicas(),
        "bytes_last_step": dt.bytes_last_step,
        "dense_bytes_per_step": dt.dense_bytes_per_step,
        "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_unchanged": torch.equal(model[0].weight, frozen_start),
        "frozen_start": frozen_start,
        "resumed_identical": torch.equal(flat_parameters(resumed), flat_parameters(model)),
    }


def averaged_gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def accumulation(rank: int, world: int) -> dict:
    """Two micro-batches under no_sync() against one backward of their summed loss."""
    model = net(1)
    spec = CompressionSpec(basis="seeded", rank=4, refresh_every=100, error_feedback=False)
    dt = disttrain.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), spec)
    with dt.no_sync():
        dt.backward(loss_of(model, rank, 0))
    dt.backward(loss_of(model, rank, 1))
    dt.step()
    accumulated = averaged_gradients(model)
    dt.zero_grad()
    dt.backward(loss_of(model, rank, 0) + loss_of(model, rank, 1))
    dt.step()
    together = averaged_gradients(model)
    errors = {}
    for name, backwards in (("no_backward", 0), ("two_backwards", 2)):
        dt.zero_grad()
        for step in range(backwards):
            dt.backward(loss_of(model, rank, step))
        with pytest.raises(RuntimeError) as error:
            dt.step()
        errors[name] = str(error.value)
    return {"accumulated": accumulated, "together": together, "errors": errors}


def both(rank: int, world: int) -> tuple[dict, dict]:
    """Both scenarios in one pair of processes: starting processes is most of the time."""
    return training_and_resume(rank, world), accumulation(rank, world)


@pytest.fixture(scope="module")
def results() -> list[tuple[dict, dict]]:
    return run_workers(both, 2)


@pytest.fixture(scope="module")
def trained(results) -> list[dict]:
    return [training for training, _ in results]


@pytest.fixture(scope="module")
def accumulated(results) -> list[dict]:
    return [accumulating for _, accumulating in results]


def test_loss_falls(trained):
    losses = trained[0]["losses"]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_replicas_are_bit_identical_after_training(trained):
    assert torch.equal(trained[0]["parameters"], trained[1]["parameters"])
    assert all(result["replicas_identical"] for result in trained)


def test_bytes_per_step_are_below_a_fiftieth_of_dense(trained):
    result = trained[0]
    assert 0 < result["bytes_last_step"] < result["dense_bytes_per_step"] / 50


def test_frozen_parameters_are_not_exchanged_and_start_from_rank_0(trained):
    assert trained[0]["dense_bytes_per_step"] == 4 * trained[0]["trainable_numel"]
    assert all(result["frozen_unchanged"] for result in trained)
    assert torch.equal(trained[0]["frozen_start"], trained[1]["frozen_start"])


def test_state_dict_resumes_training_bit_for_bit(trained):
    assert all(result["resumed_identical"] for result in trained)


def test_no_sync_accumulates_micro_batches_like_one_backward(accumulated):
    for result in accumulated:
        for a, b in zip(result["accumulated"], result["together"]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_without_backward_says_to_run_backward_first(accumulated):
    assert "step() called without a backward" in accumulated[0]["errors"]["no_backward"]


def test_two_backwards_without_no_sync_are_refused(accumulated):
    assert "run all but the last backward inside `with session.no_sync():`" in accumulated[0]["errors"]["two_backwards"]


def test_wrap_without_a_process_group_says_to_use_torchrun():
    model = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="launch your script with torchrun.*init_process_group"):
        disttrain.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_projected_method_with_a_torch_optimizer_says_to_build_projected_adamw():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="'svd-projected' keeps its optimizer's moments.*disttrain.optim.ProjectedAdamW"):
        disttrain.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "svd-projected")


def test_unknown_compression_option_names_the_valid_ones():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="unknown compression option.*'rnk'.*rank"):
        disttrain.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), METHOD, rnk=4)

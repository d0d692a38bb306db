"""HF Trainer with local-step rounds: 2 real processes over Gloo, the default method diloco-sparse-k4-h5."""

import copy

import pytest
import torch

from distributed import run_workers
from test_examples import torchrun

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from disttrain.integrations.hf import DisttrainCallback, compress_gradients  # noqa: E402
from disttrain.methods import DEFAULT_METHOD, MEMORY_LEAN_METHOD  # noqa: E402
from disttrain.train.replica import parameter_digest  # noqa: E402


class _Tiny(torch.nn.Module):
    """A linear classifier that keeps its last batch, so a test can redo its gradient."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.last_batch = (x, labels)
        return {"loss": torch.nn.functional.cross_entropy(self.linear(x), labels)}


class _Recorder(TrainerCallback):
    """Per optimizer step: whether the gradient it applies is this worker's own (redone from its batch
    without DDP), then the bytes sent so far and this rank's digest; stops training at ``stop_at``."""

    def __init__(self, model: _Tiny, exchange: DisttrainCallback, stop_at: int | None):
        self.model, self.exchange, self.stop_at = model, exchange, stop_at
        self.bytes_sent, self.digests, self.own_gradient = [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        alone = copy.deepcopy(self.model)
        alone.zero_grad()
        alone(*self.model.last_batch)["loss"].backward()
        pairs = zip(self.model.parameters(), alone.parameters())
        self.own_gradient.append(all(torch.equal(p.grad, q.grad) for p, q in pairs))

    def on_step_end(self, args, state, control, **kwargs):
        self.bytes_sent.append(self.exchange.bytes_sent)
        self.digests.append(parameter_digest(self.model).hex())
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def _train(steps: int, output_dir: str, stop_at: int | None = None, method: str = DEFAULT_METHOD) -> dict:
    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(40)]
    model = _Tiny()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2, max_grad_norm=0,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    exchange = compress_gradients(trainer, method)
    recorder = _Recorder(model, exchange, stop_at)
    trainer.add_callback(recorder)
    trainer.train()
    return {
        "exchanges": exchange.exchanges, "bytes_sent": exchange.bytes_sent, "dense_bytes": exchange.dense_bytes,
        "bytes_by_step": recorder.bytes_sent, "digests": recorder.digests, "own_gradient": recorder.own_gradient,
        "final": parameter_digest(model).hex(), "optimizer": type(trainer.optimizer.optimizer).__name__,
    }


def _rounds(rank: int, world_size: int, output_dir: str) -> dict[str, dict]:
    return {
        "10 steps": _train(10, f"{output_dir}/full"),
        "7 steps": _train(7, f"{output_dir}/short"),
        "stopped at 7": _train(10, f"{output_dir}/stopped", stop_at=7),
        "lean": _train(10, f"{output_dir}/lean", method=MEMORY_LEAN_METHOD),
    }


def _sending_steps(bytes_by_step: list[int]) -> list[int]:
    """The optimizer steps (counted from 1) after which this worker had sent more bytes."""
    return [step for step, (before, after) in enumerate(zip([0, *bytes_by_step], bytes_by_step), 1) if after > before]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> list[dict[str, dict]]:
    return run_workers(_rounds, 2, str(tmp_path_factory.mktemp("hf_rounds")))


@pytest.mark.slow
def test_the_example_trains_gpt2_in_rounds_with_identical_replicas():
    summary = torchrun("hf_gpt2_rounds.py", "--steps", "20")
    assert summary["method"] == "diloco-sparse-k4-h5"
    assert summary["final_loss"] < 0.9 * summary["first_loss"]
    assert summary["replicas_identical"]
    assert summary["compression_ratio"] >= 500


def test_inner_steps_send_nothing_and_every_fifth_step_exchanges(rounds):
    for run in (result["10 steps"] for result in rounds):
        assert run["exchanges"] == 2
        assert _sending_steps(run["bytes_by_step"]) == [5, 10]
        assert run["dense_bytes"] == 10 * 4 * 10  # 10 optimizer steps of 10 fp32 parameters


def test_inner_steps_apply_this_workers_own_gradient(rounds):
    first, second = (result["10 steps"] for result in rounds)
    assert all(first["own_gradient"]) and all(second["own_gradient"])
    assert first["digests"][2] != second["digests"][2]  # mid-round each replica is its own
    assert first["digests"][4] == second["digests"][4] and first["final"] == second["final"]


def test_a_partial_last_round_is_exchanged_at_the_last_step(rounds):
    first, second = (result["7 steps"] for result in rounds)
    assert first["exchanges"] == second["exchanges"] == 2
    assert _sending_steps(first["bytes_by_step"]) == [5, 7]
    assert first["final"] == second["final"]


def test_a_round_open_when_training_stops_early_is_exchanged_at_train_end(rounds):
    first, second = (result["stopped at 7"] for result in rounds)
    assert first["exchanges"] == second["exchanges"] == 2
    assert first["bytes_sent"] > first["bytes_by_step"][-1]  # sent after the last step, at on_train_end
    assert first["digests"][-1] != second["digests"][-1] and first["final"] == second["final"]


def test_the_memory_lean_method_steps_with_lean_adamw_in_rounds_and_ends_with_identical_replicas(rounds):
    first, second = (result["lean"] for result in rounds)
    assert first["optimizer"] == second["optimizer"] == "LeanAdamW"
    assert _sending_steps(first["bytes_by_step"]) == [5, 10]
    assert first["digests"][2] != second["digests"][2] and first["final"] == second["final"]


def test_a_lean_method_refuses_an_optimizer_given_to_trainer_that_is_not_lean_adamw(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = _Tiny()
    trainer = Trainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="keeps Adam's moments lean: give Trainer no optimizer.*not a SGD"):
        compress_gradients(trainer, MEMORY_LEAN_METHOD)


@pytest.mark.parametrize("method", ["fedavg-subspace-int8-h10", "zo-1byte", "ddp"])
def test_methods_that_do_not_run_in_trainer_are_refused_with_those_that_do(tmp_path, method):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    runs = r"choose one of: .*power-int4-r16.*diloco-sparse-k4-h5"
    with pytest.raises(ValueError, match=rf"'{method}' does not run inside Trainer.*{runs}"):
        compress_gradients(Trainer(model=_Tiny(), args=args), method)

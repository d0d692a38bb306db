"""Your own task on the command line: ``disttrain train --task FILE:FUNCTION`` with examples/own_task.py."""

from dataclasses import replace

import pytest
import torch
from test_cli import REPO, last_json_line, run

from disttrain.methods import DEFAULT_FEDERATED_METHOD, DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD
from disttrain.train.config import TrainConfig
from disttrain.train.task import UserTask, build_task, load_task_function

EXAMPLE = REPO / "examples" / "own_task.py"
TASK = f"{EXAMPLE}:build_task"


def train(*flags: str) -> dict:
    """Two workers train the example task; the run's JSON summary."""
    result = run("disttrain", "train", "--nproc", "2", "--task", TASK, *flags)
    assert result.returncode == 0, result.stderr
    return last_json_line(result.stdout)


RUNS = {
    "default method": ([], DEFAULT_METHOD),
    "per-step method": (["--method", DEFAULT_PER_STEP_METHOD], DEFAULT_PER_STEP_METHOD),
    "federated shards": pytest.param(["--mode", "federated"], DEFAULT_FEDERATED_METHOD, marks=pytest.mark.slow),
}


@pytest.mark.parametrize("flags, method", RUNS.values(), ids=RUNS.keys())
def test_own_task_trains_with_identical_replicas(flags, method):
    summary = train("--steps", "10", *flags)
    assert summary["method"] == method and summary["workers"] == 2 and summary["steps"] == 10
    assert summary["replicas_identical"] is True


@pytest.mark.slow
def test_own_task_resumes_from_its_checkpoint_bit_identical(tmp_path):
    straight = train("--steps", "10")
    checkpoints = ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "5"]
    train("--steps", "10", "--stop-at", "5", *checkpoints)
    resumed = run("disttrain", "train", "--nproc", "2", "--task", TASK, "--steps", "10", *checkpoints)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 5" in resumed.stderr
    assert last_json_line(resumed.stdout)["parameter_digest"] == straight["parameter_digest"]


NOT_FOUND = {
    "file": (f"{REPO}/examples/no_such_task.py:build_task", "no_such_task.py not found"),
    "function": (f"{EXAMPLE}:no_such_function", "has no function 'no_such_function'"),
    "module": ("no_such_package.tasks:build_task", "module no_such_package.tasks not found"),
    "no function named": (str(EXAMPLE), "name a function, as path/to/file.py:function or package.module:function"),
}


@pytest.mark.parametrize("reference, message", NOT_FOUND.values(), ids=NOT_FOUND.keys())
def test_a_task_not_found_is_one_line_and_exit_2_before_any_worker_starts(reference, message):
    result = run("disttrain", "train", "--nproc", "2", "--task", reference)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_task_function_returning_no_task_stops_the_workers_with_exit_2(tmp_path):
    (tmp_path / "bad_task.py").write_text("def build_task(config):\n    return 42\n")
    result = run("disttrain", "train", "--nproc", "2", "--task", f"{tmp_path}/bad_task.py:build_task")
    assert result.returncode == 2
    assert "returned int; expected a task: an object with a torch.nn.Module `model`" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


FAILING_TASK = """
from dataclasses import replace
from disttrain.train.task import load_task_function

def build_task(config):
    task = load_task_function("{example}:build_task")(config)
    def train_batch(step, rank, world_size):
        if step == 2:
            raise ValueError("the data ran dry at step 2")
        return task.train_batch(step, rank, world_size)
    return replace(task, train_batch=train_batch)
"""


def test_an_error_while_training_keeps_its_traceback_and_is_not_called_bad_input(tmp_path):
    (tmp_path / "failing_task.py").write_text(FAILING_TASK.format(example=EXAMPLE))
    result = run("disttrain", "train", "--nproc", "1", "--task", f"{tmp_path}/failing_task.py:build_task", "--steps", "4")
    assert result.returncode not in (0, 2), result.stderr
    assert "Traceback" in result.stderr and "ValueError: the data ran dry at step 2" in result.stderr


# Task functions that get one thing wrong, for the checks at task build (this module is importable by name).
def example(config: TrainConfig) -> UserTask:
    return load_task_function(TASK)(config)


def batch_as_a_list(config: TrainConfig) -> UserTask:
    task = example(config)
    return replace(task, train_batch=lambda *where: list(task.train_batch(*where)))


def model_without_targets(config: TrainConfig) -> UserTask:
    return replace(example(config), model=torch.nn.Linear(16, 256))


class FlatLogits(torch.nn.Module):
    """The example's model with its logits flattened: evaluation could not score them."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = self.inner(inputs, targets)
        return logits.flatten(), loss


def flat_logits(config: TrainConfig) -> UserTask:
    task = example(config)
    return replace(task, model=FlatLogits(task.model))


def no_validation(config: TrainConfig) -> UserTask:
    return replace(example(config), val_batches=list)


def no_train_set(config: TrainConfig) -> UserTask:
    return replace(example(config), train_set=None)


BAD_TASKS = {
    "batch as a list": (batch_as_a_list, "lm", "train_batch(0, 0, 1) is list; a batch must be a tuple of two tensors"),
    "model without targets": (model_without_targets, "lm", "the model cannot take its batch (Linear.forward() takes"),
    "flat logits": (flat_logits, "lm", "logits of shape (8192,) do not fit labels of shape (32,)"),
    "no validation": (no_validation, "lm", "val_batches() returned an empty list"),
    "federated without a train set": (no_train_set, "federated", "has none: give it a train_set"),
}


@pytest.mark.parametrize("function, mode, message", BAD_TASKS.values(), ids=BAD_TASKS.keys())
def test_a_task_that_cannot_be_trained_is_named_with_its_problem(function, mode, message):
    reference = f"{__name__}:{function.__name__}"
    with pytest.raises(ValueError, match=r"^--task ") as error:
        build_task(TrainConfig(task=reference, mode=mode))
    assert message in str(error.value) and reference in str(error.value)

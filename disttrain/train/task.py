"""Tasks: the model being trained and the data each worker feeds it.

The trainer needs three things from a task: a model, this worker's training batch for a step,
and the validation batches (the same on every worker). A batch is (inputs, targets) for the
small GPT, or a dict of tensors with ``labels`` for a Hugging Face classifier.

``--task path/to/file.py:function`` (or ``module:function``) names your own: the function receives
the TrainConfig and returns the task, a UserTask for instance; it is checked here before training.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, Union

import torch

from disttrain.data.corpus import ByteCorpus
from disttrain.federated.task import ClientShards, VerseClassificationTask, labels_of
from disttrain.models.gpt import GPT
from disttrain.train.config import TrainConfig
from disttrain.train.forward import forward_outputs

Batch = Union[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class Task(Protocol):
    model: torch.nn.Module

    def train_batch(self, step: int, rank: int, world_size: int) -> Batch:
        """This worker's batch for ``step``: a pure function of (seed, rank, step)."""

    def val_batches(self) -> list[Batch]:
        """A fixed set of validation batches, the same on every worker."""


class LanguageModelTask:
    """The small GPT on the bundled byte-level corpus."""

    def __init__(self, config: TrainConfig):
        self.model = GPT(config.model)
        self.corpus = ByteCorpus(config.data, config.seed)

    def train_batch(self, step: int, rank: int, world_size: int) -> Batch:
        return self.corpus.train_batch(step, rank, world_size)

    def val_batches(self) -> list[Batch]:
        return self.corpus.val_batches()


@dataclass
class UserTask:
    """What a --task function may return: the model, its batches and, for --mode federated, a labelled training set."""

    model: torch.nn.Module
    train_batch: Callable[[int, int, int], Batch]  # (step, rank, world_size) -> this worker's batch
    val_batches: Callable[[], list[Batch]]
    train_set: Batch | None = None  # one row per example, (inputs, labels) or a dict with labels: cut into client shards


TASK_FORMS = "path/to/file.py:function or package.module:function"
BATCH_FORMS = (
    "a tuple of two tensors (inputs, targets), called as model(inputs, targets) and returning (logits, loss), "
    "or a dict of tensors with 'labels', called as model(**batch) and returning an object with .logits and .loss"
)


@functools.cache
def load_task_function(reference: str) -> Callable[[TrainConfig], Any]:
    """The function a --task reference names, its file or module imported (once per process)."""
    where = f"--task {reference}"
    source, colon, name = reference.rpartition(":")
    if not (colon and source and name):
        raise ValueError(f"{where}: name a function, as {TASK_FORMS}")
    module = _import_file(source, where) if source.endswith(".py") else _import_module(source, where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{where}: {source} has no function {name!r}; define `def {name}(config): ...` there")
    return function


def _import_file(path: str, where: str) -> ModuleType:
    """The module of a .py file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{where}: file {path} not found (a relative path starts from the current directory, {Path.cwd()})")
    name = f"disttrain_task_{file.stem}"  # in sys.modules, so that dataclasses defined in the file work
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import_module(name: str, where: str) -> ModuleType:
    """An importable module by its dotted name."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{name}.".startswith(f"{error.name}."):
            raise  # a module that the task's module imports is missing
        raise ValueError(
            f"{where}: module {name} not found: install it or put its directory on PYTHONPATH, "
            "or name its file (path/to/file.py:function)"
        ) from None


def _kind(value: object) -> str:
    """What a value is, for error messages: its type and, for a tuple or dict, its items' types."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{key}={type(item).__name__}" for key, item in value.items()) + ")"
    if isinstance(value, tuple):
        return "tuple(" + ", ".join(type(item).__name__ for item in value) + ")"
    return type(value).__name__


def is_task(task: object) -> bool:
    """Whether ``task`` has a torch model, ``train_batch`` and ``val_batches``."""
    methods = (getattr(task, name, None) for name in ("train_batch", "val_batches"))
    return isinstance(getattr(task, "model", None), torch.nn.Module) and all(map(callable, methods))


def check_batch(batch: object, what: str) -> None:
    """A batch the engines can feed a model: (inputs, targets) tensors, or a dict of tensors with labels."""
    if isinstance(batch, dict):
        fits = isinstance(batch.get("labels"), torch.Tensor) and all(isinstance(t, torch.Tensor) for t in batch.values())
    else:
        fits = isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)
    if not fits:
        raise ValueError(f"{what} is {_kind(batch)}; a batch must be {BATCH_FORMS}")


def check_forward(model: torch.nn.Module, batch: Batch, where: str) -> None:
    """The model takes ``batch`` as the trainer passes it, and returns logits that evaluation can score."""
    training = model.training
    model.eval()  # no dropout draws, no batch-norm statistics updated
    try:
        with torch.no_grad():
            logits, labels, loss = forward_outputs(model, batch, "fp32")
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{where}: the model cannot take its batch ({error}); a batch must be {BATCH_FORMS}") from None
    finally:
        model.train(training)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise ValueError(f"{where}: the model's loss must be a scalar tensor, got {_kind(loss)}")
    if not (isinstance(logits, torch.Tensor) and logits.shape[:-1] == labels.shape):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else _kind(logits)
        raise ValueError(
            f"{where}: logits of shape {shape} do not fit labels of shape {tuple(labels.shape)}; evaluation counts "
            "logits.argmax(-1) == labels, so logits need the labels' shape and one more dimension for the classes"
        )


def client_shards_of(task: object, config: TrainConfig, where: str) -> ClientShards:
    """The task's labelled training set cut into the clients' shards (--mode federated)."""
    train_set = getattr(task, "train_set", None)
    if train_set is None:
        raise ValueError(
            f"{where}: --mode federated cuts the task's labelled training set into client shards, and it has none: "
            "give it a train_set, (inputs, labels) or a dict of tensors with 'labels', one row per example"
        )
    check_batch(train_set, f"{where}: train_set")
    tensors = list(train_set.values()) if isinstance(train_set, dict) else list(train_set)
    if labels_of(train_set).dim() != 1 or len({t.shape[:1] for t in tensors}) != 1:
        raise ValueError(
            f"{where}: train_set needs one label per example and one row per example in every tensor, "
            f"got shapes {[tuple(t.shape) for t in tensors]}"
        )
    return ClientShards(train_set, config.federated, config.seed)


def build_own_task(config: TrainConfig) -> Task:
    """What the --task function returns for ``config``, checked; in --mode federated, fed from its client's shard."""
    where = f"--task {config.task}"
    task = load_task_function(str(config.task))(config)
    if not is_task(task):
        raise ValueError(
            f"{where} returned {_kind(task)}; expected a task: an object with a torch.nn.Module `model`, "
            "`train_batch(step, rank, world_size)` and `val_batches()`, such as disttrain.train.task.UserTask"
        )
    if config.mode == "federated":
        task = UserTask(task.model, client_shards_of(task, config, where).train_batch, task.val_batches)
    batch = task.train_batch(0, 0, 1)
    check_batch(batch, f"{where}: train_batch(0, 0, 1)")
    val_batches = task.val_batches()
    if not (isinstance(val_batches, list) and val_batches):
        got = "an empty list" if isinstance(val_batches, list) else _kind(val_batches)
        raise ValueError(f"{where}: val_batches() returned {got}; it must return a non-empty list of batches")
    check_batch(val_batches[0], f"{where}: val_batches()[0]")
    check_forward(task.model, batch, where)
    return task


def build_task(config: TrainConfig) -> Task:
    if config.task is not None:
        return build_own_task(config)
    if config.mode == "federated":
        return VerseClassificationTask(config.federated, config.seed)
    return LanguageModelTask(config)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)  # type: ignore[return-value]

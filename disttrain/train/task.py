"""Tasks: the model being trained and the data each worker feeds it.

The trainer needs three things from a task: a model, this worker's training batch for a step,
and the validation batches (the same on every worker). A batch is (inputs, targets) for the
small GPT, or a dict of tensors with ``labels`` for a Hugging Face classifier.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch

from disttrain.data.corpus import ByteCorpus
from disttrain.models.gpt import GPT
from disttrain.train.config import TrainConfig

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


def build_task(config: TrainConfig) -> Task:
    if config.mode == "federated":
        from disttrain.federated.task import VerseClassificationTask  # needs transformers

        return VerseClassificationTask(config.federated, config.seed)
    return LanguageModelTask(config)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)  # type: ignore[return-value]

"""Your own model and data, trained by `disttrain train` with every method: ``--task FILE:FUNCTION``.

    disttrain train --nproc 2 --task examples/own_task.py:build_task --steps 20
    disttrain train --nproc 2 --task examples/own_task.py:build_task --steps 20 --method power-int4-r16
    disttrain train --nproc 2 --task examples/own_task.py:build_task --steps 20 --mode federated

A plain torch next-byte classifier (an MLP over the last 16 bytes) on the bundled King James text.
``build_task`` receives the run's TrainConfig (only its seed is read here) and returns a UserTask:
the model, each worker's batch for a step, the validation batches and, for --mode federated, a
labelled training set that disttrain cuts into label-skewed client shards.
"""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch
from torch import nn

from disttrain.train.config import TrainConfig
from disttrain.train.task import UserTask

CONTEXT = 16  # bytes the model sees
BATCH = 32  # examples per worker per step, and per validation batch
VAL_BATCHES = 4
TRAIN_SET = 8192  # labelled examples for --mode federated to cut into client shards
VAL_FRACTION = 0.05  # the end of the text is held out


class NextByte(nn.Module):
    """Embeds the last CONTEXT bytes and predicts the next one through one hidden layer."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.hidden = nn.Linear(CONTEXT * 32, width)
        self.out = nn.Linear(width, 256)

    def forward(self, context: torch.Tensor, next_byte: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss): the tuple batch (inputs, targets) is passed as model(inputs, targets)."""
        logits = self.out(torch.relu(self.hidden(self.embed(context).flatten(1))))
        return logits, nn.functional.cross_entropy(logits, next_byte)


def load_text() -> torch.Tensor:
    """The bundled King James text, one uint8 per byte."""
    raw = gzip.decompress(resources.files("disttrain.data").joinpath("kjv.txt.gz").read_bytes())
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def examples_at(text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the CONTEXT bytes from each start, the byte after them) as int64."""
    windows = text[starts[:, None] + torch.arange(CONTEXT + 1)].long()
    return windows[:, :CONTEXT], windows[:, CONTEXT]


def random_examples(text: torch.Tensor, seed: list[int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` examples at starts drawn from ``seed`` alone."""
    starts = np.random.default_rng(seed).integers(0, len(text) - CONTEXT, count)
    return examples_at(text, torch.from_numpy(starts))


def build_task(config: TrainConfig) -> UserTask:
    """The model and its data; every batch is a pure function of (seed, step, rank), so a resumed run continues the stream."""
    text = load_text()
    split = int(len(text) * (1 - VAL_FRACTION))
    train, held_out = text[:split], text[split:]
    val_starts = torch.linspace(0, len(held_out) - CONTEXT - 1, VAL_BATCHES * BATCH).long()
    val_batches = [examples_at(held_out, starts) for starts in val_starts.split(BATCH)]

    def train_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_examples(train, [config.seed, step, rank], BATCH)

    return UserTask(
        model=NextByte(),
        train_batch=train_batch,
        val_batches=lambda: val_batches,
        train_set=random_examples(train, [config.seed], TRAIN_SET),
    )

"""The forward pass of a task's batch: a tuple (inputs, targets) for the small GPT, a dict for Hugging Face models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from disttrain.train.task import Batch


def forward_outputs(model: torch.nn.Module, batch: Batch, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, loss) of ``model`` on ``batch``, under bf16 autocast when asked.

    A tuple batch is (inputs, targets) for the small GPT; a dict batch goes to a Hugging Face
    model as keyword arguments, ``labels`` included.
    """
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    with torch.autocast(first.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if isinstance(batch, dict):
            output = model(**batch)
            return output.logits, batch["labels"], output.loss
        logits, loss = model(*batch)
        return logits, batch[1], loss


def forward_loss(model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
    """The model's loss on ``batch``."""
    return forward_outputs(model, batch, precision)[2]

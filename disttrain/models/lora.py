"""LoRA adapters for any torch model: every linear layer frozen, plus a trained low-rank B A beside it.

What federated fine-tuning usually sends (FedIT, Flower and FedML ship it): only the adapters and
the new head are trainable, so the exchange carries only them. ``add_lora`` works on any
``nn.Module``; ``LoraConfig`` is the ``--lora.*`` section of ``disttrain train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.options import option

# What a Hugging Face classifier puts on top of its encoder; "auto" trains those a model has in full. The
# pooler is among them: frozen, a pooler that never learned (as MiniLM's, which sentence-transformers
# trains with mean pooling) holds the adapters back (31% against 59% in the federated benchmark).
HEAD_MODULES = ("pre_classifier", "classifier", "pooler", "score")
TrainWhole = tuple[str, ...] | Literal["auto"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) B A x`` with ``base`` frozen; B starts at zero, so the model starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        weight = base.weight
        bound = 1 / math.sqrt(base.in_features)  # torch's default Linear init (kaiming uniform, a = sqrt(5))
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0, train_whole: TrainWhole = "auto", seed: int = 0) -> list[str]:
    """Freeze ``model`` and put a LoRA adapter on each of its linear layers, except the modules named in
    ``train_whole`` (a name or the end of a dotted one; "auto": those of HEAD_MODULES the model has),
    which are trained in full. Every replica given the same seed draws the same adapters. Returns the
    names of the adapted layers."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets, whole = lora_targets(model, train_whole)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, generator))
    for name in whole:
        model.get_submodule(name).requires_grad_(True)
    return [name for name, _ in targets]


def lora_targets(model: nn.Module, train_whole: TrainWhole) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """The linear layers that get an adapter and the full names of the modules trained whole; a clear
    error where ``train_whole`` names a module the model does not have (or "auto" finds none), or
    nothing is left to adapt."""
    def named(name: str, short: str) -> bool:
        return name == short or name.endswith("." + short)

    names = [name for name, _ in model.named_modules()]
    if train_whole == "auto":
        train_whole = tuple(head for head in HEAD_MODULES if any(named(name, head) for name in names))
        if not train_whole:
            raise ValueError(
                f"lora.train-whole auto: the model has none of the usual head modules ({', '.join(HEAD_MODULES)}); "
                "name the modules to train in full (a new head), or '' for adapters only"
            )
    whole = [name for name in names if any(named(name, w) for w in train_whole)]
    missing = [w for w in train_whole if not any(named(name, w) for name in whole)]
    if missing:
        raise ValueError(f"lora.train-whole names modules the model does not have: {missing}; name a module of the model or ''")
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == w or name.startswith(w + ".") for w in whole)
    ]
    if not targets:
        raise ValueError("the model has no linear layer to put a LoRA adapter on (lora.rank needs nn.Linear layers)")
    return targets, whole


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (``--lora.rank`` > 0): the base model frozen, only adapters and ``train_whole`` trained and sent."""

    rank: int = option(0, "LoRA rank of an adapter on every linear layer; only adapters and train-whole are trained and sent (0: off)")
    alpha: float = option(16.0, "an adapter adds (alpha / rank) B A x")
    train_whole: str = option(
        "auto",
        "comma-separated modules trained in full beside the adapters (a new head); auto: those of "
        f"{', '.join(HEAD_MODULES)} that the model has",
    )

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: no adapters), got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")

    @property
    def whole(self) -> TrainWhole:
        """The modules trained in full: a tuple of names, or "auto"."""
        if self.train_whole.strip() == "auto":
            return "auto"
        return tuple(name.strip() for name in self.train_whole.split(",") if name.strip())

    def check(self, model: nn.Module) -> None:
        """Refuse, before anything is spawned, adapters that ``model`` could not take."""
        if self.rank:
            lora_targets(model, self.whole)

    def apply(self, model: nn.Module, seed: int) -> None:
        """Put this config's adapters on ``model``; with rank 0, leave it as it is."""
        if self.rank:
            add_lora(model, self.rank, self.alpha, self.whole, seed)

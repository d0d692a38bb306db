"""LoRA adapters for any torch model: every linear layer frozen, plus a trained low-rank B A beside it.

What federated fine-tuning usually sends (FedIT, Flower and FedML ship it): only the adapters and
the new head are trainable, so the exchange carries only them. ``add_lora`` works on any
``nn.Module``; ``LoraConfig`` is the ``--lora.*`` section of ``disttrain train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.options import option


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


def add_lora(
    model: nn.Module, rank: int, alpha: float = 16.0, train_whole: tuple[str, ...] = ("classifier",), seed: int = 0
) -> list[str]:
    """Freeze ``model`` and put a LoRA adapter on each of its linear layers, except the modules named in
    ``train_whole`` (a name or the end of a dotted one), which are trained in full. Every replica given the
    same seed draws the same adapters. Returns the names of the adapted layers."""
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


def lora_targets(model: nn.Module, train_whole: tuple[str, ...]) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """The linear layers that get an adapter and the full names of the modules trained whole; a clear
    error where ``train_whole`` names a module the model does not have, or nothing is left to adapt."""
    def named(name: str, short: str) -> bool:
        return name == short or name.endswith("." + short)

    whole = [name for name, _ in model.named_modules() if any(named(name, w) for w in train_whole)]
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
    train_whole: str = option("classifier", "comma-separated modules trained in full beside the adapters (the new head)")

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: no adapters), got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")

    @property
    def whole(self) -> tuple[str, ...]:
        """The modules trained in full, as a tuple of names."""
        return tuple(name.strip() for name in self.train_whole.split(",") if name.strip())

    def check(self, model: nn.Module) -> None:
        """Refuse, before anything is spawned, adapters that ``model`` could not take."""
        if self.rank:
            lora_targets(model, self.whole)

    def apply(self, model: nn.Module, seed: int) -> None:
        """Put this config's adapters on ``model``; with rank 0, leave it as it is."""
        if self.rank:
            add_lora(model, self.rank, self.alpha, self.whole, seed)

"""The optimizer a method trains with, its hyper-parameters from the config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from disttrain.methods import PROJECTED_OPTIMIZERS, Method
from disttrain.optim.lean_adamw import LeanAdamW
from disttrain.optim.lowrank_orthogonal import LowRankOrthogonal
from disttrain.optim.projected_adamw import ProjectedAdamW
from disttrain.train.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], method: Method, config: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW, its lean version, plain SGD, or an optimizer that reads averaged coefficients from the exchange
    it is attached to (ProjectedAdamW, LowRankOrthogonal)."""
    o = config.optim
    if method.engine == "zeroth_order":
        return torch.optim.SGD(params, lr=config.peak_lr)  # it only holds the scheduled lr; the codes make the update
    if method.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.peak_lr, weight_decay=o.weight_decay)
    if method.optimizer == "lean_adamw":
        return LeanAdamW(params, lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if method.optimizer not in PROJECTED_OPTIMIZERS:
        return torch.optim.AdamW(params, lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    scale = method.galore_scale if o.galore_scale is None else o.galore_scale
    kind = LowRankOrthogonal if method.optimizer == "orthogonal" else ProjectedAdamW
    return kind(
        params, lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, scale=scale,
        refresh_moments=method.refresh_moments,
    )

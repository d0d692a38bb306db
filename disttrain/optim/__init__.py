"""Optimizers fed by all-reduced projections."""

from disttrain.optim.projected_adamw import ProjectedAdamW, optimizer_state_bytes

__all__ = ["ProjectedAdamW", "optimizer_state_bytes"]

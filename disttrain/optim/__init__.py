"""Optimizers of disttrain's methods: ones fed by all-reduced projections, and a lean AdamW."""

from disttrain.optim.lean_adamw import LeanAdamW
from disttrain.optim.projected_adamw import ProjectedAdamW, optimizer_state_bytes

__all__ = ["LeanAdamW", "ProjectedAdamW", "optimizer_state_bytes"]

"""AdamW in a quarter of its state: the first moment in bf16, the second factored (Adafactor).

For a matrix g of r x c, Adafactor keeps the running means of g**2 over its rows and over its
columns (r + c numbers instead of r * c) and estimates the second moment as their outer product
over their mean. 1-D and scalar parameters keep a full fp32 second moment: they are few. The
update is Adam's, with bias correction and decoupled weight decay, so the learning rate means what
it means for torch AdamW. Per weight of a matrix this keeps 2 bytes where AdamW keeps 8.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LeanAdamW(torch.optim.Optimizer):
    """Adam's update from a bf16 first moment and a factored second moment."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded moments to their parameter's dtype; the first moment goes back to bf16."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "exp_avg" in state:
                state["exp_avg"] = state["exp_avg"].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state.update(second_moment_state(p))
                state["step"] += 1
                step = state["step"].item()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                state["exp_avg"].copy_(exp_avg)
                second = update_second_moment(state, grad, beta2)
                denom = (second / (1 - beta2**step)).sqrt_().add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(exp_avg.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - beta1**step))
        return loss


def factored(p: torch.Tensor) -> bool:
    """Whether ``p``'s second moment is kept as row and column means (matrices and up)."""
    return p.dim() >= 2


def second_moment_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zeroed second-moment statistics for ``p``: row and column means, or a full fp32 tensor."""
    if not factored(p):
        return {"exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
    return {
        "row_mean_sq": torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device),
        "col_mean_sq": torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device),
    }


def update_second_moment(state: dict[str, torch.Tensor], grad: torch.Tensor, beta2: float) -> torch.Tensor:
    """Fold ``grad`` into the running statistics; the (not bias-corrected) second-moment estimate."""
    squared = grad.square()
    if "exp_avg_sq" in state:
        return state["exp_avg_sq"].lerp_(squared, 1 - beta2).clone()
    rows = state["row_mean_sq"].lerp_(squared.mean(dim=-1), 1 - beta2)
    cols = state["col_mean_sq"].lerp_(squared.mean(dim=-2), 1 - beta2)
    scale = rows.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (rows / scale).unsqueeze(-1) * cols.unsqueeze(-2)

"""ProjectedAdamW: GaLore's Adam, with moments in the low-rank space of the all-reduced projection.

For a projected weight the averaged coefficients R (r x n) feed Adam moments of shape r x n,
and the update is  W <- W - lr * scale * P (m_hat / (sqrt(v_hat) + eps)),  then decoupled weight
decay, as in GaLore (Zhao et al., 2024) and galore-torch's AdamW. Parameters that travel dense
get plain AdamW. One worker with an SVD basis is GaLore; many workers stay identical because
every input of the step (R, P, the moments) is identical on all of them.

When the basis changes (a refresh), ``refresh_moments`` says what the r x n moments become:
"keep" them as they are (galore-torch), "reproject" them into the new basis with
T = P_new^T P_old (m <- T m, v <- (T*T) v, which keeps v >= 0; Flora's momentum transfer), or
"reset" them and restart Adam's bias correction.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Protocol, get_args

import torch

from disttrain.comm.layout import tensors_bytes
from disttrain.compress.base import Compressor

RefreshMoments = Literal["keep", "reproject", "reset"]
REFRESH_MOMENTS = get_args(RefreshMoments)


class CoefficientSource(Protocol):
    def coefficients(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, Compressor] | None:
        """Averaged coefficients of ``param`` for this step and the compressor that reads them."""


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds in an optimizer's per-parameter state tensors (its shards, under FSDP2)."""
    return tensors_bytes(value for state in optimizer.state.values() for value in state.values())


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose moments for projected weights live in the r x n coefficient space."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scale: float = 0.25,
        source: CoefficientSource | None = None,
        refresh_moments: RefreshMoments = "keep",
    ):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid ProjectedAdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        if refresh_moments not in REFRESH_MOMENTS:
            raise ValueError(f"unknown refresh_moments {refresh_moments!r}; use one of {', '.join(REFRESH_MOMENTS)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale, refresh_moments=refresh_moments)
        super().__init__(params, defaults)
        self.source = source

    def attach(self, source: CoefficientSource) -> None:
        """Read projected gradients from ``source`` (a CompressedAllReduce) at every step."""
        self.source = source

    def _low_rank_gradient(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, Compressor | None] | None:
        entry = self.source.coefficients(p) if self.source is not None else None
        if entry is not None:
            coeffs, compressor = entry
            if tuple(coeffs.shape) != tuple(p.shape):
                return coeffs, compressor
            return coeffs.to(p.dtype), None
        return None if p.grad is None else (p.grad, None)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                entry = self._low_rank_gradient(p)
                if entry is None:
                    continue
                grad, compressor = entry
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if compressor is None:
                    self._adam_step(p, grad, None, group)
                else:
                    self._projected_step(p, grad, compressor, group)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def _projected_step(self, p: torch.nn.Parameter, coeffs: torch.Tensor, compressor: Compressor, group: dict) -> None:
        """Update a projected weight from its averaged coefficients: Adam in the coefficient space."""
        self._adam_step(p, coeffs, compressor, group)

    def _adam_step(self, p: torch.nn.Parameter, grad: torch.Tensor, compressor: Compressor | None, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        if state["exp_avg"].shape != grad.shape:
            raise ValueError(
                f"the coefficients changed shape from {tuple(state['exp_avg'].shape)} to {tuple(grad.shape)}, so Adam's "
                "moments cannot follow them (a power-step basis changes side every step): use it with the "
                "'adamw' or 'orthogonal' optimizer"
            )
        if compressor is not None and group["refresh_moments"] != "keep":
            follow_basis(state, compressor.basis_matrix().to(grad.device), group["refresh_moments"])
        state["step"] += 1
        step = state["step"].item()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad.float(), 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad.float(), grad.float(), value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        direction = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        if compressor is not None:
            direction = compressor.reconstruct(direction) * group["scale"]
        p.add_(direction.to(p.dtype), alpha=-step_size)

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self)


def follow_basis(state: dict, basis: torch.Tensor, policy: RefreshMoments) -> None:
    """Carry the moments in ``state`` over a change of basis to ``basis`` (d x r), as ``policy`` says."""
    previous = state.get("basis")
    if previous is not None and torch.equal(previous, basis):
        return
    state["basis"] = basis.clone()
    if previous is None:
        return
    if policy == "reset":
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        state["step"].zero_()
        return
    transfer = basis.t() @ previous  # r x r: new coordinates of the old directions
    state["exp_avg"].copy_(transfer @ state["exp_avg"])
    state["exp_avg_sq"].copy_(transfer.square() @ state["exp_avg_sq"])

"""Error feedback: what compression dropped this step is added to the next step's gradient."""

from __future__ import annotations

from typing import Any

import torch

from disttrain.compress.base import Compressor, CompressorWrapper, check_gradient


class ErrorFeedback(CompressorWrapper):
    """Wraps any compressor and keeps the local residual e <- (g + e) - decode(encode(g + e)).

    The residual computed by encode() stays pending until commit(), so a step whose collective
    fails can rollback() and leave the buffer exactly as it was. Summed over steps, what was
    sent plus the current residual equals the sum of the gradients. With ``momentum`` mu > 0 the
    buffer also keeps mu of what was sent, e <- (g + e) - (1 - mu) decode(encode(g + e)): it is
    then the momentum as well (Dion's error feedback).
    """

    residual: torch.Tensor | None = None
    _pending: torch.Tensor | None = None

    def __init__(self, inner: Compressor, momentum: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"feedback momentum must lie in [0, 1), got {momentum}")
        super().__init__(inner)
        self.momentum = momentum

    def corrected(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient plus the committed residual."""
        check_gradient(grad)
        grad = grad.detach().float()
        return grad if self.residual is None else grad + self.residual

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        target = self.corrected(grad)
        wire = self.inner.encode(target)
        self._pending = target - (1 - self.momentum) * self.inner.reconstruct(self.inner.decode(wire))
        return wire

    def commit(self) -> None:
        if self._pending is not None:
            self.residual, self._pending = self._pending, None
        self.inner.commit()

    def rollback(self) -> None:
        self._pending = None
        self.inner.rollback()

    def propose_basis(self, grad: torch.Tensor) -> torch.Tensor:
        return self.inner.propose_basis(self.corrected(grad))

    def captured_energy(self, grad: torch.Tensor) -> tuple[float, float]:
        return self.inner.captured_energy(self.corrected(grad))

    def state_dict(self) -> dict[str, Any]:
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.residual is not None:
            state["residual"] = self.residual.clone()
        return state

    def shared_state_dict(self) -> dict[str, Any]:
        """The inner compressor's shared state; the residual belongs to this worker alone."""
        return {f"inner.{k}": v for k, v in self.inner.shared_state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual = state.get("residual")
        self.residual = None if residual is None else residual.float().clone()
        self._pending = None
        self.inner.load_state_dict({k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")})

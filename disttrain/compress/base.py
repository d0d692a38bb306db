"""The Compressor protocol that the communication layer and the optimizers talk to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


def check_gradient(grad: torch.Tensor, shape: torch.Size | None = None) -> None:
    """Names the problem when a gradient cannot be compressed."""
    if not grad.is_floating_point():
        raise TypeError(
            f"gradient has dtype {grad.dtype}: disttrain compresses floating-point gradients only; "
            "keep trainable parameters in a float dtype"
        )
    if shape is not None and grad.shape != shape:
        raise ValueError(f"gradient has shape {tuple(grad.shape)}, but the compressor was built for {tuple(shape)}")


class Compressor(ABC):
    """Encodes one parameter's gradient into a flat wire payload, and decodes it back.

    Three spaces: the gradient (the parameter's shape), the coefficients (float32, e.g. the
    r x n projection R = P^T G), and the wire (a flat tensor that one collective moves).
    When ``summable`` is true, wire payloads of different workers may be summed elementwise
    (all_reduce); otherwise every payload is decoded on its own (all_gather).
    """

    summable: bool = True

    @property
    @abstractmethod
    def coeff_shape(self) -> tuple[int, ...]:
        """Shape of the coefficients."""

    @property
    @abstractmethod
    def wire_dtype(self) -> torch.dtype:
        """dtype of the flat wire payload."""

    @abstractmethod
    def wire_numel(self) -> int:
        """Number of wire elements per encoded gradient."""

    @abstractmethod
    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient -> flat wire payload."""

    @abstractmethod
    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        """Flat wire payload (or a sum of summable payloads) -> float32 coefficients."""

    @abstractmethod
    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Coefficients -> a full-size tensor in the parameter's shape."""

    def mean_of_payloads(self, payloads: torch.Tensor, divisor: int) -> torch.Tensor:
        """The workers' decoded coefficients summed in rank order, over ``divisor``; ``payloads`` holds one
        worker's wire bytes per row (an all_gather's output)."""
        total = self.decode(_as_wire(payloads[0], self))
        for payload in payloads[1:]:
            total = total + self.decode(_as_wire(payload, self))
        return total / divisor

    def coeff_numel(self) -> int:
        numel = 1
        for size in self.coeff_shape:
            numel *= size
        return numel

    def wire_bytes(self) -> int:
        return self.wire_numel() * torch.empty((), dtype=self.wire_dtype).element_size()

    def round_trip(self, grad: torch.Tensor) -> torch.Tensor:
        """What the receiver rebuilds from this worker's gradient alone."""
        return self.reconstruct(self.decode(self.encode(grad)))

    # Basis schedule. Compressors with no data-dependent basis keep these defaults.
    def begin_step(self, step: int) -> None:
        """Called before encoding step ``step``; seeded bases pick their refresh index here."""

    def needs_shared_basis(self, step: int) -> bool:
        """True when a data-dependent basis must be computed by one worker and broadcast."""
        return False

    def propose_basis(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent basis")

    def request_refresh(self) -> None:
        """Recompute a data-dependent basis at the next step (the adaptive schedule)."""

    def captured_energy(self, grad: torch.Tensor) -> tuple[float, float]:
        """(||P^T G||^2, ||G||^2) for a projected gradient; (0, 0) when nothing is projected."""
        return 0.0, 0.0

    def basis_numel(self) -> int:
        return 0

    def basis_matrix(self) -> torch.Tensor | None:
        """The current basis P (d x r) of a projecting compressor; None for the others."""
        return None

    def set_basis(self, basis: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent basis")

    def accept_mean(self, coeffs: torch.Tensor) -> None:
        """This step's averaged coefficients, identical on every worker; a basis that follows the
        average derives its next one here (it lands on commit())."""

    # Transactional state (error feedback): a step's state changes only land on commit().
    def commit(self) -> None:
        """Make the state computed by the last encode() current."""

    def rollback(self) -> None:
        """Forget the state computed by the last encode()."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (or shared_state_dict())."""

    def shared_state_dict(self) -> dict[str, Any]:
        """The part of the state every worker holds identically (bases), for joiners."""
        return self.state_dict()

    def state_bytes(self) -> int:
        """Bytes of persistent state this compressor holds (bases, residuals)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values() if torch.is_tensor(t))


class CompressorWrapper(Compressor):
    """Delegates everything to ``inner``; subclasses override only what they change."""

    def __init__(self, inner: Compressor):
        self.inner = inner
        self.summable = inner.summable

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return self.inner.coeff_shape

    @property
    def wire_dtype(self) -> torch.dtype:
        return self.inner.wire_dtype

    def wire_numel(self) -> int:
        return self.inner.wire_numel()

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(grad)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(wire)

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        return self.inner.reconstruct(coeffs)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def needs_shared_basis(self, step: int) -> bool:
        return self.inner.needs_shared_basis(step)

    def propose_basis(self, grad: torch.Tensor) -> torch.Tensor:
        return self.inner.propose_basis(grad)

    def request_refresh(self) -> None:
        self.inner.request_refresh()

    def captured_energy(self, grad: torch.Tensor) -> tuple[float, float]:
        return self.inner.captured_energy(grad)

    def basis_numel(self) -> int:
        return self.inner.basis_numel()

    def basis_matrix(self) -> torch.Tensor | None:
        return self.inner.basis_matrix()

    def set_basis(self, basis: torch.Tensor) -> None:
        self.inner.set_basis(basis)

    def accept_mean(self, coeffs: torch.Tensor) -> None:
        self.inner.accept_mean(coeffs)

    def commit(self) -> None:
        self.inner.commit()

    def rollback(self) -> None:
        self.inner.rollback()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def shared_state_dict(self) -> dict[str, Any]:
        return self.inner.shared_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def load_compressor_states(compressors: list[Compressor], saved: list[dict[str, Any]]) -> None:
    """Restore one state per compressor, refusing state written for a different model."""
    if len(saved) != len(compressors):
        raise ValueError(
            f"checkpoint has compressor state for {len(saved)} parameters, the model has "
            f"{len(compressors)}: it was written for a different model"
        )
    for compressor, entry in zip(compressors, saved):
        compressor.load_state_dict(entry)


def _as_wire(raw: torch.Tensor, compressor: Compressor) -> torch.Tensor:
    """Bytes of one payload back into the compressor's wire dtype."""
    return raw.clone().view(compressor.wire_dtype)

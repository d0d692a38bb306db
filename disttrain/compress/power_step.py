"""A low-rank basis that follows the gradient for free: one power step per exchange, alternating sides.

PowerSGD finds a gradient's top subspace with two all-reduces per step (M Q, then M^T P). This
compressor does one of them per step. With the shared factor Q (n x r) every worker sends
Q^T M^T, the r x m coefficients of M Q; their average is the same bit for bit on every worker,
so its orthonormalised columns are the next factor P (m x r), and the next step sends P^T M.
The basis is a power iteration driven by the averaged gradient and warm-started from step to
step: it tracks the gradient's top subspace and costs no bytes of its own. It starts from a
seeded random factor. The next factor is computed on the CPU in float64 from the identical
average, so every worker derives the same one.

With ``explore`` > 0, only the product's top rank - explore directions are followed, and the rest
of the factor is seeded random directions orthogonal to them, drawn anew each step: they probe
what the followed subspace misses, still at no bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain import kernels
from disttrain.compress.base import Compressor, check_gradient
from disttrain.compress.lowrank import as_matrix_shape
from disttrain.kernels.seeded import StreamKey


_EXPLORE_STREAM = 1  # tells the exploring directions' random stream apart from the starting factor's


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of ``matrix`` (d x r), computed alike on every worker."""
    return torch.linalg.qr(matrix.detach().to("cpu", torch.float64))[0].to(matrix.device, torch.float32)


def followed_and_explored(product: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns: the top ``r - e`` left singular vectors of ``product`` (d x r), then
    the ``e`` columns of ``probe`` (d x e) made orthogonal to them. Float64 on the CPU, alike everywhere."""
    kept = product.shape[1] - probe.shape[1]
    followed = torch.linalg.svd(product.detach().to("cpu", torch.float64), full_matrices=False)[0][:, :kept]
    probe = probe.to("cpu", torch.float64)
    explored = torch.linalg.qr(probe - followed @ (followed.t() @ probe))[0]
    return torch.cat([followed, explored], dim=1).to(product.device, torch.float32)


class PowerStepCompressor(Compressor):
    """Sends factor^T X, where X is the gradient matrix M or its transpose, whichever the factor fits.

    ``transposed`` False: the factor P lives in M's row space (m x r) and coefficients are P^T M
    (r x n). True: the factor Q lives in the column space (n x r) and coefficients are Q^T M^T
    (r x m). Each committed step swaps the two, with the next factor taken from this step's average.
    """

    def __init__(
        self,
        shape: torch.Size,
        rank: int,
        seed: int,
        param_id: int,
        wire_dtype: torch.dtype = torch.float32,
        explore: int = 0,
    ):
        self.shape = torch.Size(shape)
        self.dims = as_matrix_shape(self.shape)
        if not 0 < rank < min(self.dims):
            raise ValueError(f"rank must be in [1, {min(self.dims)}) for a {self.dims[0]}x{self.dims[1]} weight, got {rank}")
        if not 0 <= explore < rank:
            raise ValueError(f"explore must be in [0, rank) = [0, {rank}): the factor follows at least one direction; got {explore}")
        self.rank, self.explore = rank, explore
        self.seed, self.param_id, self.step = seed, param_id, 0
        self._wire_dtype = wire_dtype
        self.transposed = False
        self.factor = kernels.seeded_matrix(StreamKey.derive(seed, 0, param_id), self.dims[0], rank, "gaussian")
        self._next: tuple[torch.Tensor, bool] | None = None

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return (self.rank, self.dims[0] if self.transposed else self.dims[1])

    @property
    def wire_dtype(self) -> torch.dtype:
        return self._wire_dtype

    def wire_numel(self) -> int:
        return self.coeff_numel()

    def _oriented(self, grad: torch.Tensor) -> torch.Tensor:
        matrix = grad.detach().reshape(self.dims)
        return matrix.t() if self.transposed else matrix

    def _factor_on(self, device: torch.device) -> torch.Tensor:
        """The factor, moved once to the device the data lives on (it starts on the CPU)."""
        if self.factor.device != device:
            self.factor = self.factor.to(device)
        return self.factor

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        check_gradient(grad, self.shape)
        return kernels.project(self._oriented(grad), self._factor_on(grad.device), "left").reshape(-1).to(self._wire_dtype)

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        return wire.float().reshape(self.coeff_shape)

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        oriented = kernels.reconstruct(coeffs, self._factor_on(coeffs.device), "left")
        return (oriented.t() if self.transposed else oriented).reshape(self.shape)

    def captured_energy(self, grad: torch.Tensor) -> tuple[float, float]:
        oriented = self._oriented(grad).float()
        factor = self._factor_on(oriented.device)
        return kernels.project(oriented, factor, "left").square().sum().item(), oriented.square().sum().item()

    def basis_matrix(self) -> torch.Tensor:
        return self.factor

    def begin_step(self, step: int) -> None:
        self.step = step

    def accept_mean(self, coeffs: torch.Tensor) -> None:
        product = coeffs.t()
        if self.explore:
            key = StreamKey.derive(self.seed, self.step, self.param_id, _EXPLORE_STREAM)
            probe = kernels.seeded_matrix(key, product.shape[0], self.explore, "gaussian")
            self._next = (followed_and_explored(product, probe), not self.transposed)
        else:
            self._next = (orthonormal_columns(product), not self.transposed)

    def commit(self) -> None:
        if self._next is not None:
            (self.factor, self.transposed), self._next = self._next, None

    def rollback(self) -> None:
        self._next = None

    def state_dict(self) -> dict[str, Any]:
        """The factor is shared state: a joiner takes it from the others."""
        return {"factor": self.factor.clone(), "transposed": self.transposed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.dims[1 if state["transposed"] else 0], self.rank
        if tuple(state["factor"].shape) != expected:
            raise ValueError(
                f"saved power-step factor has shape {tuple(state['factor'].shape)}, expected {expected}: "
                "the checkpoint was written for a different model or rank"
            )
        self.factor = state["factor"].float().clone()
        self.transposed = bool(state["transposed"])
        self._next = None

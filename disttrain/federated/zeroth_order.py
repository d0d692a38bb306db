"""Shared-seed zeroth-order steps (SPSA as in MeZO, "Just One Byte", FedKSeed): one byte per client per step.

Each step, client k measures the loss slope along its own seeded direction z_k on its own batch,
g_k = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps), and sends g_k as one int8 code; one all_gather
of W bytes hands every client every code, and every client applies
w -= lr * sum_k dequantize(code_k) * z_k / W, regenerating each z_k in rank order, so replicas
stay bit-identical.

Directions come from the counter-based generator of ``kernels.seeded`` (Triton on CUDA, the torch
reference elsewhere, the same bits on both), keyed by (job seed, step, rank, parameter id, chunk):
a parameter's z is made one chunk of ``chunk_numel`` entries at a time and never stored.

Restoring the weights after the two evaluations uses a copy of the trainable parameters, not
MeZO's +eps, -2eps, +eps arithmetic: that chain does not return fp32 weights bit for bit (weights
smaller than eps lose their low bits outright), and since each client perturbs along its own z,
replicas would drift apart by rounding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
from torch import nn

from disttrain import kernels
from disttrain.comm.bucket import all_gather_flat
from disttrain.kernels.seeded import Distribution, StreamKey, random_bits
from disttrain.options import option

log = logging.getLogger(__name__)

BYTES_PER_STEP = 1
"""What one client puts into a step's one collective: its int8 code. Seed, step and rank are agreed
beforehand, so nothing else travels; the all_gather delivers W codes to each client."""

CODE_LIMIT = 127
Rounding = Literal["stochastic", "nearest"]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class ZOConfig:
    """Settings every client must share: they fix the directions and what a code means.

    ``clip`` bounds |g|: the int8 code c stands for c * clip / 127. ``rounding`` "stochastic"
    rounds g to one of its two neighbouring codes with a seeded coin (unbiased below the clip).
    """

    eps: float = option(1e-3, "size of the SPSA perturbation along each seeded direction")
    lr: float = option(1e-6, "step size applied to the mean projected gradient")
    clip: float = option(16.0, "largest |projected gradient| one int8 code can carry")
    distribution: Distribution = option("rademacher", "the seeded directions' entries: rademacher (+-1) or gaussian")
    rounding: Rounding = option("stochastic", "stochastic (unbiased, seeded coin) or nearest rounding to a code")
    chunk_numel: int = option(2**20, "parameters perturbed per generated chunk (memory, not maths)")

    def __post_init__(self) -> None:
        for name in ("eps", "clip", "chunk_numel"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ZOConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.lr >= 0:
            raise ValueError(f"ZOConfig.lr must be >= 0, got {self.lr}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown distribution {self.distribution!r}; use 'gaussian' or 'rademacher'")
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"unknown rounding {self.rounding!r}; use 'stochastic' or 'nearest'")


@dataclass
class ZOState:
    """What a client carries between steps: the shared config and job seed, the step index, its group."""

    config: ZOConfig
    seed: int
    step: int = 0
    group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class ZOStepResult:
    """One client's view of a step: its mean perturbed loss, its g, its code, and the bytes it sent."""

    loss: float
    projected_grad: float
    code: int
    bytes_sent: int


def quantize(g: float, clip: float, offset: float = 0.5) -> int:
    """The int8 code floor(g * 127 / clip + offset), g clipped to [-clip, clip]; non-finite g gives 0.

    ``offset`` 0.5 rounds to the nearest code; a uniform draw from [0, 1) rounds stochastically.
    """
    if not math.isfinite(g):
        return 0
    scaled = g / clip  # exactly +-1 at the clip (g * 127 / clip need not be 127)
    if abs(scaled) >= 1.0:
        return int(math.copysign(CODE_LIMIT, scaled))  # saturate: -127 + an offset near 1 would round to -126
    return max(-CODE_LIMIT, min(CODE_LIMIT, math.floor(scaled * CODE_LIMIT + offset)))


def dequantize(code: int, clip: float) -> float:
    """The projected gradient an int8 code stands for."""
    return code * clip / CODE_LIMIT


def rounding_offset(seed: int, step: int, rank: int, rounding: Rounding) -> float:
    """``quantize``'s offset: 0.5, or a uniform draw from [0, 1) keyed by (seed, step, rank)."""
    if rounding == "nearest":
        return 0.5
    bits = random_bits(torch.zeros(1, dtype=torch.int64), StreamKey.derive(seed, step, rank)).item()
    return (bits >> 8) / 2**24


def direction(
    seed: int, step: int, rank: int, param_id: int, chunk: int, like: torch.Tensor, distribution: Distribution
) -> torch.Tensor:
    """Client ``rank``'s z for one chunk of one parameter: unit-variance fp32 entries, as many as ``like`` has."""
    key = StreamKey.derive(seed, step, rank, param_id, chunk)
    # A one-row seeded matrix has entry scale 1: signs are exactly +-1, Gaussian entries unit variance.
    return kernels.seeded_matrix(key, 1, like.numel(), distribution, device=like.device).view(-1)


def _pieces(tensors: Sequence[torch.Tensor], chunk_numel: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(parameter id, chunk index, flat view of the chunk) for every chunk of every tensor."""
    for param_id, tensor in enumerate(tensors):
        flat = tensor.detach().view(-1)
        for chunk, start in enumerate(range(0, flat.numel(), chunk_numel)):
            yield param_id, chunk, flat[start : start + chunk_numel]


def _perturb_(
    params: Sequence[torch.Tensor],
    origins: Sequence[torch.Tensor],
    alpha: float,
    seed: int,
    step: int,
    rank: int,
    config: ZOConfig,
) -> None:
    """params = origins + alpha * z_rank, chunk by chunk."""
    pairs = zip(_pieces(params, config.chunk_numel), _pieces(origins, config.chunk_numel))
    for (param_id, chunk, piece), (_, _, origin) in pairs:
        z = direction(seed, step, rank, param_id, chunk, piece, config.distribution)
        torch.add(origin, z, alpha=alpha, out=piece)


@torch.no_grad()
def projected_gradient(
    params: Sequence[torch.Tensor], evaluate: Callable[[], float], seed: int, step: int, rank: int, config: ZOConfig
) -> tuple[float, float]:
    """(g, mean loss) from ``evaluate`` at w + eps z and w - eps z; ``params`` come back bit for bit.

    Both evaluations start from the same RNG state, so dropout draws the same masks in each.
    """
    origins = [p.detach().clone() for p in params]
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        _perturb_(params, origins, config.eps, seed, step, rank, config)
        with torch.random.fork_rng(devices=cuda_devices):
            loss_plus = evaluate()
        _perturb_(params, origins, -config.eps, seed, step, rank, config)
        loss_minus = evaluate()
    finally:
        for param, origin in zip(params, origins):
            param.detach().copy_(origin)
    return (loss_plus - loss_minus) / (2 * config.eps), (loss_plus + loss_minus) / 2


@torch.no_grad()
def apply_update_(params: Sequence[torch.Tensor], codes: Sequence[int], seed: int, step: int, config: ZOConfig) -> None:
    """w -= lr * sum_k dequantize(code_k) * z_k / W, each z_k regenerated, in rank order: the same bits everywhere."""
    terms = [(rank, dequantize(code, config.clip)) for rank, code in enumerate(codes) if code]
    if not terms:
        return
    for param_id, chunk, piece in _pieces(params, config.chunk_numel):
        total = torch.zeros(piece.shape, dtype=torch.float32, device=piece.device)
        for rank, value in terms:
            total.add_(direction(seed, step, rank, param_id, chunk, piece, config.distribution), alpha=value)
        piece.add_(total, alpha=-config.lr / len(codes))


def exchange(code: int, group: dist.ProcessGroup | None) -> tuple[list[int], int]:
    """(every client's code in rank order, bytes this client sent): one all_gather of one int8 each."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    payload = torch.tensor([code], dtype=torch.int8, device=device)
    gathered = torch.empty(dist.get_world_size(group), dtype=torch.int8, device=device)
    all_gather_flat(gathered, payload, group=group)
    return gathered.tolist(), payload.numel() * payload.element_size()


def zo_step(model: nn.Module, loss_fn: LossFn, batch: Any, state: ZOState) -> ZOStepResult:
    """One step on this client's ``batch``: measure g, send its byte, apply every client's update.

    ``loss_fn(model, batch)`` returns a scalar loss. Clients that start with identical weights and
    ``state`` stay identical. Without an initialised process group the client is alone: nothing
    is sent and its own code is applied.
    """
    config = state.config
    params = [p for p in model.parameters() if p.requires_grad]
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(state.group) if grouped else 0
    g, loss = projected_gradient(params, lambda: float(loss_fn(model, batch)), state.seed, state.step, rank, config)
    if not math.isfinite(g):
        log.warning("zeroth-order step %d: non-finite loss on rank %d; sending a zero gradient", state.step, rank)
    code = quantize(g, config.clip, rounding_offset(state.seed, state.step, rank, config.rounding))
    codes, sent = exchange(code, state.group) if grouped else ([code], 0)
    apply_update_(params, codes, state.seed, state.step, config)
    state.step += 1
    return ZOStepResult(loss=loss, projected_grad=g, code=code, bytes_sent=sent)

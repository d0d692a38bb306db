"""Split a data set's sample indices across federated clients: IID, or label-skewed by Dirichlet(alpha).

Both are reproducible from an explicit seed (a numpy Generator of their own; the global RNG is
never touched), cover every sample exactly once, and leave no client empty.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _check_clients(num_samples: int, num_clients: int) -> None:
    """Every client must be able to hold at least one sample."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(f"cannot give {num_clients} clients a sample each from only {num_samples} samples")


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[list[int]]:
    """A random permutation of range(num_samples) cut into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(num_samples, num_clients)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def _fill_empty_clients(parts: list[list[int]], rng: np.random.Generator) -> None:
    """Each empty client, in index order, takes one random sample from the then largest client (lowest index on ties).

    The donor always keeps a sample: while a client is empty and there are at least as many
    samples as clients, the largest client holds two or more.
    """
    for part in parts:
        if not part:
            donor = max(range(len(parts)), key=lambda other: len(parts[other]))
            part.append(parts[donor].pop(int(rng.integers(len(parts[donor])))))


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Label-skewed split: each class's samples go to clients in proportions drawn from Dirichlet(alpha).

    Small alpha concentrates each class on few clients; large alpha approaches an IID split.
    Classes are visited in sorted order, each shuffled and cut at the cumulative proportions.
    Clients left empty are then given one sample each (see ``_fill_empty_clients``).
    Returns each client's sample indices, sorted.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    label_array = np.asarray(labels).reshape(-1)
    _check_clients(len(label_array), num_clients)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for part, share in zip(parts, np.split(members, cuts)):
            part.extend(share.tolist())
    _fill_empty_clients(parts, rng)
    return [sorted(part) for part in parts]

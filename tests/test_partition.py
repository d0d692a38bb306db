"""Client partitions for federated runs: IID and Dirichlet label skew."""

import math
from collections import Counter

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from disttrain.federated.partition import dirichlet_partition, iid_partition

seeds = st.integers(0, 2**32 - 1)
label_lists = st.lists(st.integers(0, 9), min_size=1, max_size=300)
alphas = st.floats(1e-3, 1e3)


@st.composite
def dirichlet_cases(draw):
    """(labels, num_clients, alpha, seed) with at least as many samples as clients."""
    labels = draw(label_lists)
    return labels, draw(st.integers(1, len(labels))), draw(alphas), draw(seeds)


def ten_classes(per_class: int = 60) -> list[int]:
    return [label for label in range(10) for _ in range(per_class)]


def mean_label_entropy(labels: list[int], parts: list[list[int]]) -> float:
    """The mean over clients of the entropy (nats) of each client's label histogram."""
    entropies = []
    for part in parts:
        counts = Counter(labels[i] for i in part).values()
        entropies.append(-sum(c / len(part) * math.log(c / len(part)) for c in counts))
    return sum(entropies) / len(entropies)


@given(dirichlet_cases())
def test_dirichlet_partition_covers_every_sample_exactly_once(case):
    labels, num_clients, alpha, seed = case
    parts = dirichlet_partition(labels, num_clients, alpha, seed)
    assert len(parts) == num_clients
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))


@given(dirichlet_cases())
def test_dirichlet_partition_leaves_no_client_empty(case):
    labels, num_clients, alpha, seed = case
    assert all(dirichlet_partition(labels, num_clients, alpha, seed))


@pytest.mark.parametrize("seed", range(5))
def test_empty_clients_each_take_one_sample_from_the_largest(seed):
    # One class and a tiny alpha: these seeds' Dirichlet draws put every sample on one client.
    sizes = sorted(map(len, dirichlet_partition([0] * 20, 5, 1e-6, seed)))
    assert sizes == [1, 1, 1, 1, 16]


@given(dirichlet_cases())
def test_dirichlet_partition_is_reproducible_from_the_seed(case):
    labels, num_clients, alpha, seed = case
    first = dirichlet_partition(labels, num_clients, alpha, seed)
    assert first == dirichlet_partition(labels, num_clients, alpha, seed)


@given(seeds, seeds)
def test_different_seeds_give_different_dirichlet_partitions(seed, other):
    assume(seed != other)
    labels = ten_classes()
    assert dirichlet_partition(labels, 8, 1.0, seed) != dirichlet_partition(labels, 8, 1.0, other)


@given(seeds)
def test_small_alpha_skews_client_labels_more_than_large_alpha(seed):
    labels = ten_classes()
    skewed = mean_label_entropy(labels, dirichlet_partition(labels, 10, 0.05, seed))
    mixed = mean_label_entropy(labels, dirichlet_partition(labels, 10, 100.0, seed))
    assert skewed < mixed


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), seeds)
def test_iid_partition_covers_every_sample_in_near_equal_parts(sizes, seed):
    num_samples, num_clients = sizes
    parts = iid_partition(num_samples, num_clients, seed)
    assert sorted(i for part in parts for i in part) == list(range(num_samples))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == iid_partition(num_samples, num_clients, seed)


@pytest.mark.parametrize(
    ("num_clients", "alpha", "message"),
    [
        (3, 0.0, "alpha"),
        (3, -1.0, "alpha"),
        (3, math.inf, "alpha"),
        (0, 1.0, "num_clients"),
        (5, 1.0, "only 4 samples"),
    ],
)
def test_dirichlet_partition_rejects_bad_arguments(num_clients, alpha, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_partition([0, 1, 0, 1], num_clients, alpha, seed=0)

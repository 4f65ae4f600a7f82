"""Non-IID client partitions: Dirichlet over labels."""

from __future__ import annotations

import numpy as np

__all__ = ["dirichlet_partition", "label_histogram"]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        *, min_per_client: int = 2) -> list[np.ndarray]:
    """Split example indices among clients with label proportions drawn from Dirichlet(alpha).

    For each class, the share of its examples that each client gets is drawn from a symmetric
    Dirichlet(``alpha``) (Hsu et al., 2019): small ``alpha`` (0.1) gives each client few classes,
    large ``alpha`` approaches an IID split. Draws are repeated (with the same seeded generator) until
    every client holds at least ``min_per_client`` examples, so no client is empty.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label per example.
    num_clients : int
        Number of clients, at least 1.
    alpha : float
        Concentration, > 0.
    seed : int
        Seed; the same arguments give the same partition.
    min_per_client : int
        Minimum examples per client.

    Returns
    -------
    list of numpy.ndarray
        Sorted example indices for each client; together they cover every example exactly once.

    Raises
    ------
    ValueError
        On bad arguments, or if no draw in 1000 tries gives every client ``min_per_client`` examples.
    """
    labels = np.asarray(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_per_client > labels.size:
        raise ValueError(f"{labels.size} examples cannot give {num_clients} clients {min_per_client} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_per_client:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not give every client {min_per_client} examples with alpha={alpha}")


def label_histogram(labels: np.ndarray, partition: list[np.ndarray], num_labels: int) -> list[list[int]]:
    """Examples per label for each client (for the run's config record)."""
    return [np.bincount(labels[idx], minlength=num_labels).tolist() for idx in partition]

"""Demo data for federated training: scikit-learn's bundled ``load_digits`` split across peers.

The splits are pure (seeded, no I/O). :func:`load_digits_data` reads the copy
scikit-learn ships inside its package (no download); only the drivers (node,
simulator, tests) call it, never a core. A node's own data files are read by
``chimera.node.datasets``.

* :func:`load_digits_data`: 1797 8x8 images, ``X`` float64 ``(n, 64)`` scaled
  to [0, 1] (pixel value / 16), ``y`` int64 ``(n,)`` in 0..9.
* :func:`train_test_split_fixed`: a fixed, stratified held-out test set
  (default 20 %), seeded.
* :func:`split_iid`: a seeded random partition of the training set into ``n``
  near-equal shards.
* :func:`split_dirichlet`: the usual non-IID label skew (Hsu, Qi, Brown,
  "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification", 2019): for every class, the proportions of its
  samples that go to each peer are drawn from ``Dirichlet(alpha * 1_n)``;
  small ``alpha`` (e.g. 0.1) gives peers few classes each, large ``alpha``
  approaches IID. Every peer gets at least ``min_samples`` samples (redrawn up
  to 100 times, then topped up deterministically from the largest shard).

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed
gives the same split on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from chimera.protocol.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class Shard:
    """One peer's data: ``X`` float64 ``(n, n_features)``, ``y`` ``(n,)``."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def label_counts(self, n_classes: int) -> np.ndarray:
        """``(n_classes,)`` int64 count of each label (labels must be ints in 0..n_classes-1)."""
        return np.bincount(self.y.astype(np.int64), minlength=n_classes)


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The digits data: ``X`` float64 ``(1797, 64)`` in [0, 1], ``y`` int64 ``(1797,)`` in 0..9."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return np.asarray(X, dtype=np.float64) / 16.0, np.asarray(y, dtype=np.int64)


def train_test_split_fixed(X: np.ndarray, y: np.ndarray, test_fraction: float = 0.2,
                           seed: int = 0) -> tuple[Shard, Shard]:
    """Stratified split into (train, test); ``test_fraction`` in (0, 1).

    Raises:
        LocalProtocolError: bad fraction or mismatched ``X``/``y``.
    """
    if not 0 < test_fraction < 1:
        raise LocalProtocolError("test_fraction must be in (0, 1)")
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise LocalProtocolError("X must be (n, d) and y (n,)")
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        idx = idx[rng.permutation(len(idx))]
        test_idx.extend(idx[:int(round(len(idx) * test_fraction))].tolist())
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return Shard(X[~test], y[~test]), Shard(X[test], y[test])


def split_iid(shard: Shard, n_peers: int, seed: int = 0) -> list[Shard]:
    """Seeded random partition into ``n_peers`` shards whose sizes differ by at most 1.

    Raises:
        LocalProtocolError: ``n_peers`` < 1 or more peers than samples.
    """
    if type(n_peers) is not int or not 1 <= n_peers <= len(shard):
        raise LocalProtocolError(f"n_peers must be in 1..{len(shard)}")
    order = np.random.default_rng(seed).permutation(len(shard))
    return [Shard(shard.X[np.sort(part)], shard.y[np.sort(part)]) for part in np.array_split(order, n_peers)]


def split_dirichlet(shard: Shard, n_peers: int, alpha: float = 0.5, seed: int = 0,
                    min_samples: int = 10) -> list[Shard]:
    """Non-IID label-skewed partition with per-class ``Dirichlet(alpha)`` proportions.

    Args:
        shard: the training data (int labels).
        n_peers: number of shards (>= 1).
        alpha: concentration (> 0, finite); smaller is more skewed.
        seed: RNG seed.
        min_samples: fewest samples any shard gets (>= 0; ``n_peers * min_samples <= len(shard)``).
    Raises:
        LocalProtocolError: a parameter out of range.
    """
    if type(n_peers) is not int or n_peers < 1:
        raise LocalProtocolError("n_peers must be an int >= 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise LocalProtocolError("alpha must be finite and > 0")
    if type(min_samples) is not int or min_samples < 0 or n_peers * min_samples > len(shard):
        raise LocalProtocolError("min_samples must be >= 0 with n_peers * min_samples <= samples")
    rng = np.random.default_rng(seed)
    labels = np.unique(shard.y)
    parts: list[list[int]] = []
    for _ in range(100):
        parts = [[] for _ in range(n_peers)]
        for label in labels:
            idx = np.flatnonzero(shard.y == label)
            idx = idx[rng.permutation(len(idx))]
            proportions = rng.dirichlet(np.full(n_peers, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for peer, piece in enumerate(np.split(idx, cuts)):
                parts[peer].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_samples:
            break
    else:
        for peer in range(n_peers):  # deterministic top-up from the largest shard
            while len(parts[peer]) < min_samples:
                donor = max(range(n_peers), key=lambda p: (len(parts[p]), -p))
                parts[peer].append(parts[donor].pop())
    out = []
    for p in parts:
        idx = np.sort(np.array(p, dtype=np.int64))
        out.append(Shard(shard.X[idx], shard.y[idx]))
    return out

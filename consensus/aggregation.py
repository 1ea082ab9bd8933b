"""Aggregation maths for federated averaging rounds (pure; numpy + scikit-learn).

Every peer of a round computes the aggregate itself from the committed
inclusion set, so the functions here are written to give **bitwise identical**
results on every peer given the same inputs (same numpy build):

* updates are put in a fixed order, ascending by their 32-byte update hash
  (:attr:`Update.digest`), never in arrival order;
* every tensor is flattened in a fixed order (tensor names sorted) to one
  float64 vector; all sums are explicit row-by-row float64 accumulations
  (element-wise numpy operations only, no BLAS reductions whose order may
  depend on threads); sorts are stable;
* the anomaly detector uses a fixed ``random_state`` and one thread.

Terms and shapes
----------------
* A *model* is a mapping ``name -> np.ndarray``; its :class:`ModelSpec` lists
  each tensor's name, shape and dtype (``"float32"`` or ``"float64"``, stored
  little endian). ``d`` is the total number of scalars.
* An :class:`Update` is one peer's locally trained parameters for a round,
  its sample count (self-reported, >= 1), its sender's committed reputation
  weight (from the round's :class:`~chimera.consensus.quorum.WeightTable`,
  > 0) and optional local losses.
* The rules work on *deltas* ``x_i - base`` (``base``: the round's global
  model), stacked in an ``(n, d)`` float64 matrix ``X`` in update-hash order;
  the new global model is ``base + rule(X)`` cast back to each tensor's dtype.
  For the mean-type rules this equals aggregating the parameters themselves;
  median, trimmed mean and Krum are shift invariant, so deltas only matter for
  the norm bound and the anomaly features.

Rules (``f``: the number of byzantine updates the job assumes)
---------------------------------------------------------------
* ``"fedavg"``: McMahan, Moore, Ramage, Hampson, Agüera y Arcas,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017. Weighted mean with weight ``n_i * r_i`` (samples times
  reputation weight). Assumes ``f = 0``: one arbitrary update moves the result
  arbitrarily far.
* ``"median"``: coordinate-wise median (Yin, Chen, Kannan, Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML 2018). Needs ``n > 2f``; every coordinate then lies within the range of
  the honest values.
* ``"trimmed_mean"``: coordinate-wise ``f``-trimmed mean (Yin et al. 2018):
  per coordinate, drop the ``f`` largest and ``f`` smallest values, average the
  rest. Needs ``n > 2f`` (raises otherwise).
* ``"krum"`` / ``"multi_krum"``: Blanchard, El Mhamdi, Guerraoui, Stainer,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017. Score of ``i``: sum of squared distances to its ``n - f - 2``
  nearest other updates; Krum returns the update of lowest score, Multi-Krum
  the ``n_i * r_i``-weighted mean of the ``m`` lowest-scored ones (default
  ``m = n - f``). Needs ``n > 2f + 2`` (raises otherwise).
* ``"reputation_clipped"`` (this project's rule; see
  :func:`reputation_clipped_mean`): distance filter and centered clipping around the
  reputation-weighted coordinate-wise median, then a reputation x (capped)
  sample weighted mean. Assumes the byzantine updates hold **less than half of
  the reputation weight** of the round (not of the count): the center and the
  clipping radius then lie within the honest range, and each byzantine update
  moves the result by at most ``a_i / sum(a) * radius``. Updates farther than
  ``clip_cutoff`` radii from the center are dropped and reported as flagged.

Anomaly detection (:func:`detect_anomalies`)
--------------------------------------------
Per update three features: L2 norm of its delta, cosine distance of its
delta to the coordinate-wise median delta, and its reported loss change
(``loss_after - loss_before``, 0 when not reported). An update is flagged when
both (a) scikit-learn's ``IsolationForest`` (Liu, Ting, Zhou, "Isolation
Forest", ICDM 2008; fixed ``random_state``) marks it an outlier, and (b) its
one-sided robust z-score (Iglewicz & Hoaglin modified z-score,
``0.6745 * (x - median) / MAD``, MAD floored at 10 % of ``|median|``) exceeds ``z_threshold`` on at least one
feature. At most ``(n - 1) // 2`` updates are flagged (the largest z first),
so a majority is always kept. Needs ``n >= 4`` (fewer: nothing is flagged).
Flagged updates are excluded from the round and reported as
``update_flagged`` reputation observations against their senders; kept ones
as ``update_good`` (:class:`~chimera.consensus.reputation.ObservationKind`).

Errors
------
* :class:`UpdateRejected` (a :class:`~chimera.protocol.errors.RemoteProtocolError`,
  reason ``"bad_update"``): an update from a peer has wrong names, shapes or
  dtypes, non-finite values, or a delta norm above the bound. Callers turn it
  into a counted drop, never a crash.
* :class:`AggregationError` (a :class:`~chimera.protocol.errors.LocalProtocolError`):
  the rule's precondition on ``n`` and ``f`` does not hold, an unknown rule,
  or no update with positive weight. Deterministic: every peer given the same
  inclusion set raises it alike (the round core then keeps the base model).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import msgpack
import numpy as np

from chimera.protocol.errors import LocalProtocolError, RemoteProtocolError

DTYPES: Mapping[str, np.dtype] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
"""Allowed tensor dtypes (name -> little-endian numpy dtype)."""

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "reputation_clipped")
"""Aggregation rule names accepted by :func:`aggregate`."""

HASH_DOMAIN = "chimera-mesh/fl-params/v1"
MAX_TENSORS = 64
MAX_DIMS = 8
MAX_TENSOR_NAME = 64
MIN_DETECTION_UPDATES = 4


class UpdateRejected(RemoteProtocolError):
    """A peer's model update fails validation (shape, dtype, finiteness, norm bound)."""

    reason = "bad_update"


class AggregationError(LocalProtocolError):
    """A rule cannot run on these updates (e.g. Krum with ``n <= 2f + 2``)."""


# ------------------------------------------------------------------ model spec


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor: ``shape`` (tuple of ints >= 0, at most 8 dims), ``dtype`` in :data:`DTYPES`."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_TENSOR_NAME:
            raise LocalProtocolError(f"tensor name must be a str of 1..{MAX_TENSOR_NAME} chars")
        if self.dtype not in DTYPES:
            raise LocalProtocolError(f"tensor {self.name}: dtype must be one of {sorted(DTYPES)}")
        if len(self.shape) > MAX_DIMS or any(type(s) is not int or s < 0 for s in self.shape):
            raise LocalProtocolError(f"tensor {self.name}: shape must be <= {MAX_DIMS} ints >= 0")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Names, shapes and dtypes of a model's tensors (kept sorted by name).

    Raises:
        LocalProtocolError: no tensors, duplicate names, or more than 64 tensors.
    """

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.tensors, key=lambda t: t.name))
        names = [t.name for t in ordered]
        if not ordered or len(ordered) > MAX_TENSORS or len(set(names)) != len(names):
            raise LocalProtocolError(f"a model has 1..{MAX_TENSORS} tensors with distinct names")
        object.__setattr__(self, "tensors", ordered)

    @classmethod
    def of(cls, params: Mapping[str, np.ndarray]) -> "ModelSpec":
        """The spec of ``params`` (each array's dtype must be float32 or float64)."""
        tensors = []
        for name, array in params.items():
            array = np.asarray(array)
            dtype = next((k for k, v in DTYPES.items() if array.dtype == v), None)
            if dtype is None:
                raise LocalProtocolError(f"tensor {name}: dtype {array.dtype} not in {sorted(DTYPES)}")
            tensors.append(TensorSpec(name, tuple(int(s) for s in array.shape), dtype))
        return cls(tuple(tensors))

    @property
    def size(self) -> int:
        """Total number of scalars ``d``."""
        return sum(t.size for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float64 vector of shape ``(d,)``: tensors in name order, each C-order raveled.

        Raises:
            LocalProtocolError: a tensor is missing or has the wrong shape.
        """
        out = np.empty(self.size, dtype=np.float64)
        at = 0
        for t in self.tensors:
            array = params.get(t.name)
            if array is None or tuple(np.shape(array)) != t.shape:
                raise LocalProtocolError(f"tensor {t.name}: missing or not of shape {t.shape}")
            out[at:at + t.size] = np.asarray(array, dtype=np.float64).ravel(order="C")
            at += t.size
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a ``(d,)`` vector into tensors of the declared shapes, cast to the declared dtypes."""
        if vector.shape != (self.size,):
            raise LocalProtocolError(f"vector of shape {vector.shape}, expected ({self.size},)")
        out, at = {}, 0
        for t in self.tensors:
            out[t.name] = np.ascontiguousarray(vector[at:at + t.size].reshape(t.shape), dtype=DTYPES[t.dtype])
            at += t.size
        return out

    def zeros(self) -> dict[str, np.ndarray]:
        return {t.name: np.zeros(t.shape, dtype=DTYPES[t.dtype]) for t in self.tensors}

    def encode(self) -> list:
        """msgpack-able form: ``[[name, dtype, [dims...]], ...]`` in name order."""
        return [[t.name, t.dtype, list(t.shape)] for t in self.tensors]


def canonical_bytes(params: Mapping[str, np.ndarray], spec: ModelSpec) -> bytes:
    """Canonical encoding of a model: ``msgpack([HASH_DOMAIN, [[name, dtype, shape, raw], ...]])``.

    ``raw`` is the tensor cast to its declared dtype, little endian, C order.
    Raises:
        UpdateRejected: a tensor is missing or has the wrong shape.
    """
    items = []
    for t in spec.tensors:
        array = params.get(t.name)
        if array is None or tuple(np.shape(array)) != t.shape:
            raise UpdateRejected(f"tensor {t.name}: missing or not of shape {t.shape}")
        raw = np.ascontiguousarray(array, dtype=DTYPES[t.dtype]).tobytes(order="C")
        items.append([t.name, t.dtype, list(t.shape), raw])
    return msgpack.packb([HASH_DOMAIN, items], use_bin_type=True)


def aggregate_hash(params: Mapping[str, np.ndarray], spec: ModelSpec) -> bytes:
    """SHA-256 (32 bytes) of :func:`canonical_bytes`: the identity of a (global) model."""
    return hashlib.sha256(canonical_bytes(params, spec)).digest()


# ---------------------------------------------------------------------- updates


@dataclass(frozen=True, slots=True)
class Update:
    """One peer's update for a round.

    Args:
        sender: the peer id that signed it.
        params: name -> array as declared by the job's :class:`ModelSpec`.
        num_samples: local training samples (>= 1; self-reported).
        weight: the sender's committed reputation weight for the round (> 0, finite).
        digest: 32-byte update hash (orders updates; see ``training.update_hash``).
            Empty: computed as SHA-256 of sender, sample count and :func:`canonical_bytes`.
        loss_before: local loss of the base model on the sender's data (>= 0), if reported.
        loss_after: local loss after local training (>= 0), if reported.
    Raises:
        LocalProtocolError: ``num_samples`` < 1 or ``weight`` not finite and > 0.
    """

    sender: str
    params: Mapping[str, np.ndarray]
    num_samples: int
    weight: float = 1.0
    digest: bytes = b""
    loss_before: float | None = None
    loss_after: float | None = None

    def __post_init__(self) -> None:
        if type(self.num_samples) is not int or self.num_samples < 1:
            raise LocalProtocolError("num_samples must be an int >= 1")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight <= 0:
            raise LocalProtocolError("weight must be a finite number > 0")
        if not self.digest:
            spec = ModelSpec.of(self.params)
            body = msgpack.packb([self.sender, self.num_samples], use_bin_type=True)
            object.__setattr__(self, "digest", hashlib.sha256(body + canonical_bytes(self.params, spec)).digest())
        elif len(self.digest) != 32:
            raise LocalProtocolError("digest is 32 bytes")

    @property
    def loss_change(self) -> float:
        if self.loss_before is None or self.loss_after is None:
            return 0.0
        return float(self.loss_after) - float(self.loss_before)


def validate_update(params: Mapping[str, np.ndarray], spec: ModelSpec, *,
                    base: Mapping[str, np.ndarray] | None = None, max_norm: float = math.inf) -> float:
    """Check one update; returns the L2 norm of its delta (of ``params`` itself without ``base``).

    Checks: exactly the spec's tensor names, each an ndarray of the declared
    shape and dtype, all values finite, and the delta's L2 norm (float64) at
    most ``max_norm``.

    Raises:
        UpdateRejected: on the first failed check (message names the tensor).
    """
    if set(params) != set(spec.names):
        raise UpdateRejected(f"tensors {sorted(params)[:8]} differ from {list(spec.names)[:8]}")
    total = 0.0
    for t in spec.tensors:
        array = params[t.name]
        if not isinstance(array, np.ndarray) or array.shape != t.shape or array.dtype != DTYPES[t.dtype]:
            raise UpdateRejected(f"tensor {t.name}: not an array of shape {t.shape} and dtype {t.dtype}")
        if not np.isfinite(array).all():
            raise UpdateRejected(f"tensor {t.name}: non-finite values")
        delta = array.astype(np.float64)
        if base is not None:
            delta = delta - np.asarray(base[t.name], dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    norm = math.sqrt(total)
    if not math.isfinite(norm) or norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} above the bound {max_norm:.4g}")
    return norm


# ------------------------------------------------------------------ primitives


def _ordered(updates: Sequence[Update]) -> list[Update]:
    ordered = sorted(updates, key=lambda u: u.digest)
    for a, b in zip(ordered, ordered[1:]):
        if a.digest == b.digest:
            raise AggregationError("the same update (hash) appears twice")
    return ordered


def _weighted_sum(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_i weights[i] * X[i]`` accumulated row by row in float64 (fixed order)."""
    acc = np.zeros(X.shape[1], dtype=np.float64)
    for i in range(X.shape[0]):
        if weights[i] != 0.0:
            acc += weights[i] * X[i]
    return acc


def fedavg(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray) -> np.ndarray:
    """FedAvg (McMahan et al. 2017) times reputation: ``sum(a_i x_i) / sum(a_i)``, ``a_i = n_i * r_i``.

    Args:
        X: ``(n, d)`` float64 deltas (rows in update-hash order).
        samples: ``(n,)`` sample counts (>= 1).
        reputation: ``(n,)`` reputation weights (> 0).
    Returns:
        ``(d,)`` float64. Assumption on f: f = 0 (not robust).
    Raises:
        AggregationError: no rows or zero total weight.
    """
    a = np.asarray(samples, dtype=np.float64) * np.asarray(reputation, dtype=np.float64)
    total = float(np.sum(a)) if len(a) else 0.0
    if X.shape[0] == 0 or not total > 0:
        raise AggregationError("FedAvg needs at least one update with positive weight")
    return _weighted_sum(X, a) / total


def coordinate_median(X: np.ndarray, f: int = 0) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018) of ``(n, d)`` float64 -> ``(d,)`` float64.

    Even ``n``: mean of the two middle values. Robust while ``f < n / 2``.
    Raises:
        AggregationError: ``n == 0`` or ``n <= 2f``.
    """
    n = X.shape[0]
    if n == 0 or n <= 2 * f:
        raise AggregationError(f"the median needs n > 2f updates (n={n}, f={f})")
    return np.median(X, axis=0)


def trimmed_mean(X: np.ndarray, f: int) -> np.ndarray:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest per coordinate.

    Args:
        X: ``(n, d)`` float64.
        f: values trimmed on each side (>= 0); assumes at most ``f`` byzantine updates.
    Returns:
        ``(d,)`` float64, within the honest values' range per coordinate when at most f are byzantine.
    Raises:
        AggregationError: ``n <= 2f``.
    """
    n = X.shape[0]
    if f < 0 or n <= 2 * f:
        raise AggregationError(f"the trimmed mean needs n > 2f updates (n={n}, f={f})")
    S = np.sort(X, axis=0, kind="stable")[f:n - f]
    return _weighted_sum(S, np.ones(S.shape[0])) / S.shape[0]


def pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    """``(n, n)`` float64 squared L2 distances (explicit differences, deterministic)."""
    n, d = X.shape
    D = np.zeros((n, n), dtype=np.float64)
    block = max(1, (1 << 22) // max(1, d))  # rows per chunk: temporaries stay near 32 MiB
    for i in range(n - 1):
        for j in range(i + 1, n, block):
            diff = X[j:j + block] - X[i]
            row = np.einsum("ij,ij->i", diff, diff)
            D[i, j:j + len(row)] = row
            D[j:j + len(row), i] = row
    return D


def krum_scores(X: np.ndarray, f: int) -> np.ndarray:
    """Krum scores (Blanchard et al. 2017): for each i the sum of its ``n - f - 2`` smallest
    squared distances to other updates. ``(n,)`` float64.

    Raises:
        AggregationError: ``n <= 2f + 2``.
    """
    n = X.shape[0]
    if f < 0 or n <= 2 * f + 2:
        raise AggregationError(f"Krum needs n > 2f + 2 updates (n={n}, f={f})")
    D = pairwise_sq_distances(X)
    k = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(D[i], i), kind="stable")
        scores[i] = float(np.sum(others[:k])) if k > 0 else 0.0
    return scores


def krum_select(X: np.ndarray, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` lowest Krum scores (ties: lower index, i.e. smaller update hash).

    With ``n > 2f + 2`` and at most f byzantine rows, Krum's choice is
    (Blanchard et al. 2017, Prop. 1) close to the honest mean; a far outlier
    never has the lowest score.
    Raises:
        AggregationError: ``n <= 2f + 2`` or ``m`` not in ``1..n``.
    """
    scores = krum_scores(X, f)
    if not 1 <= m <= X.shape[0]:
        raise AggregationError(f"multi-Krum m must be in 1..{X.shape[0]}")
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


def weighted_coordinate_median(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lower weighted median per coordinate: the smallest value whose cumulative weight
    (values sorted ascending, stable) reaches half the total. ``(n, d)`` -> ``(d,)``.

    If the rows of weight strictly below half the total are arbitrary, each
    coordinate of the result lies within the range of the other rows.
    """
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(X, axis=0, kind="stable")
    cum = np.cumsum(w[order], axis=0)
    idx = np.argmax(2.0 * cum >= float(np.sum(w)), axis=0)
    return np.take_along_axis(X, order, axis=0)[idx, np.arange(X.shape[1])]


def reputation_clipped_mean(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray,
                            cutoff: float = 4.0) -> np.ndarray:
    """This project's reputation-weighted robust rule: filtered, centered clipping around a
    reputation-weighted coordinate-wise median.

    Steps (all float64, rows in update-hash order):

    1. center ``c``: coordinate-wise weighted median of the rows with weights ``r_i``
       (reputation only: sample counts are self-reported and could be inflated);
    2. radius ``tau``: weighted median (weights ``r_i``) of the distances ``d_i = ||x_i - c||``;
    3. filter: rows with ``d_i > cutoff * tau`` get no weight (far outliers, e.g. scaled updates);
    4. clip: ``y_i = c + (x_i - c) * min(1, tau / d_i)``;
    5. result: ``sum(a_i y_i) / sum(a_i)`` over the kept rows with
       ``a_i = r_i * min(n_i, median(n))`` (sample counts capped at the median count).

    Inspired by centered clipping (Karimireddy, He, Jaggi, "Learning from
    History for Byzantine Robust Optimization", ICML 2021) with the median
    center of Yin et al. 2018, both reputation weighted.

    Args:
        X: ``(n, d)`` float64 deltas; samples, reputation: ``(n,)`` (>= 1, > 0).
        cutoff: distance filter in units of ``tau`` (> 1).
    Returns:
        ``(d,)`` float64.
    Assumption on f: byzantine rows hold less than half of ``sum(r_i)``. Then
    ``c`` and ``tau`` lie within the honest range, and each byzantine row is
    either filtered or moves the result by at most ``a_i / sum(a) * tau``; a
    peer whose reputation weight decays loses influence proportionally.
    Raises:
        AggregationError: no rows or zero total weight.
    """
    return _reputation_clipped(X, samples, reputation, cutoff)[0]


def _reputation_clipped(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray,
                        cutoff: float) -> tuple[np.ndarray, list[int]]:
    n = X.shape[0]
    r = np.asarray(reputation, dtype=np.float64)
    if n == 0 or not float(np.sum(r)) > 0:
        raise AggregationError("the reputation-clipped mean needs an update with positive weight")
    center = weighted_coordinate_median(X, r)
    dist = np.sqrt(np.einsum("ij,ij->i", X - center, X - center))
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(r[order])
    tau = float(dist[order][int(np.argmax(2.0 * cum >= float(np.sum(r))))])
    cap = float(np.median(np.asarray(samples, dtype=np.float64)))
    a = r * np.minimum(np.asarray(samples, dtype=np.float64), cap)
    acc = np.zeros(X.shape[1], dtype=np.float64)
    total = 0.0
    filtered = []
    for i in range(n):
        if dist[i] > cutoff * tau:
            filtered.append(i)
            continue
        scale = 1.0 if dist[i] <= tau or dist[i] == 0.0 else tau / float(dist[i])
        acc += a[i] * (center + (X[i] - center) * scale)
        total += float(a[i])
    return acc / total, filtered


# ------------------------------------------------------------- anomaly detection


@dataclass(frozen=True, slots=True)
class AnomalyReport:
    """Result of :func:`detect_anomalies` (rows in update-hash order).

    ``features``: ``(n, 3)`` float64 (delta norm, cosine distance to the median delta in
    [0, 2], loss change); ``z``: ``(n,)`` max one-sided robust z-score; ``iforest_outlier``:
    ``(n,)`` bool; ``flagged``: digests of the flagged updates.
    """

    digests: tuple[bytes, ...]
    features: np.ndarray
    z: np.ndarray
    iforest_outlier: np.ndarray
    flagged: frozenset[bytes]


def robust_z(values: np.ndarray, min_relative_scale: float = 0.1) -> np.ndarray:
    """One-sided modified z-score ``0.6745 * (x - median) / MAD`` per column of ``(n, k)`` float64.

    The MAD of a column is floored at ``min_relative_scale * |median|`` so that a
    feature whose values are nearly equal (e.g. cosine distances of nearly
    orthogonal non-IID updates, all ~0.7) does not turn small differences into
    large z. If the floored MAD is 0, the column's mean absolute deviation scaled
    by ``0.7979`` replaces it (``0.6745 * MAD ~ 0.7979 * MeanAD`` for a normal
    law); if that is 0 too the column's z is 0. Values below the median get 0.
    Returns ``(n, k)`` float64 >= 0.
    """
    med = np.median(values, axis=0)
    dev = values - med
    mad = np.maximum(np.median(np.abs(dev), axis=0), min_relative_scale * np.abs(med))
    mean_ad = np.mean(np.abs(dev), axis=0)
    z = np.zeros_like(values, dtype=np.float64)
    for j in range(values.shape[1]):
        if mad[j] > 0:
            z[:, j] = 0.6745 * dev[:, j] / mad[j]
        elif mean_ad[j] > 0:
            z[:, j] = 0.7979 * dev[:, j] / mean_ad[j]
    return np.maximum(z, 0.0)


def update_features(X: np.ndarray, loss_change: np.ndarray) -> np.ndarray:
    """``(n, 3)`` float64 features: delta norm, cosine distance to the coordinate-wise
    median delta (1 when either vector is zero, 0 when both are), loss change."""
    med = np.median(X, axis=0)
    med_norm = float(np.sqrt(np.dot(med, med)))
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    cos_dist = np.empty(X.shape[0], dtype=np.float64)
    for i in range(X.shape[0]):
        if norms[i] == 0.0 and med_norm == 0.0:
            cos_dist[i] = 0.0
        elif norms[i] == 0.0 or med_norm == 0.0:
            cos_dist[i] = 1.0
        else:
            cos_dist[i] = 1.0 - float(np.dot(X[i], med)) / (float(norms[i]) * med_norm)
    return np.column_stack([norms, cos_dist, np.asarray(loss_change, dtype=np.float64)])


def detect_anomalies(X: np.ndarray, digests: Sequence[bytes], loss_change: np.ndarray, *,
                     z_threshold: float = 3.5, n_estimators: int = 25, random_state: int = 0) -> AnomalyReport:
    """Flag outlying updates (IsolationForest AND robust z-score; see the module docstring).

    Args:
        X: ``(n, d)`` float64 deltas in update-hash order.
        digests: the ``n`` update hashes in the same order.
        loss_change: ``(n,)`` reported ``loss_after - loss_before`` (0 if unknown).
        z_threshold: one-sided modified z-score above which a feature is extreme (> 0).
        n_estimators: trees of the IsolationForest (>= 1).
        random_state: IsolationForest seed (the same on every peer).
    Returns:
        :class:`AnomalyReport`; nothing is flagged when ``n < 4``.
    """
    from sklearn.ensemble import IsolationForest

    n = X.shape[0]
    features = update_features(X, loss_change) if n else np.zeros((0, 3))
    z = robust_z(features).max(axis=1) if n else np.zeros(0)
    outlier = np.zeros(n, dtype=bool)
    flagged: frozenset[bytes] = frozenset()
    if n >= MIN_DETECTION_UPDATES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forest = IsolationForest(n_estimators=n_estimators, random_state=random_state, n_jobs=1)
            outlier = forest.fit(features).predict(features) == -1
        candidates = [i for i in range(n) if outlier[i] and z[i] > z_threshold]
        candidates.sort(key=lambda i: (-z[i], i))
        flagged = frozenset(digests[i] for i in candidates[:(n - 1) // 2])
    return AnomalyReport(tuple(digests), features, z, outlier, flagged)


# -------------------------------------------------------------------- aggregate


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    """How a round aggregates (identical on every peer: part of the committed job).

    Args:
        rule: one of :data:`RULES`.
        f: byzantine updates assumed (>= 0); used by median, trimmed mean, Krum.
        multi_krum_m: updates Multi-Krum averages (``None``: ``n - f``).
        detect: run :func:`detect_anomalies` and exclude flagged updates first.
        z_threshold: see :func:`detect_anomalies`.
        iforest_estimators: see :func:`detect_anomalies`.
        random_state: IsolationForest seed.
        clip_cutoff: ``reputation_clipped`` distance filter in units of its radius (> 1).
    Raises:
        LocalProtocolError: unknown rule or out-of-range value.
    """

    rule: str = "fedavg"
    f: int = 0
    multi_krum_m: int | None = None
    detect: bool = False
    z_threshold: float = 3.5
    iforest_estimators: int = 25
    random_state: int = 0
    clip_cutoff: float = 4.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise LocalProtocolError(f"unknown aggregation rule {str(self.rule)[:32]!r}; one of {RULES}")
        if type(self.f) is not int or self.f < 0:
            raise LocalProtocolError("f must be an int >= 0")
        if self.multi_krum_m is not None and (type(self.multi_krum_m) is not int or self.multi_krum_m < 1):
            raise LocalProtocolError("multi_krum_m must be an int >= 1 or None")
        if not (math.isfinite(self.z_threshold) and self.z_threshold > 0) or self.iforest_estimators < 1:
            raise LocalProtocolError("z_threshold must be > 0 and iforest_estimators >= 1")
        if not (math.isfinite(self.clip_cutoff) and self.clip_cutoff > 1):
            raise LocalProtocolError("clip_cutoff must be finite and > 1")

    def min_updates(self) -> int:
        """Fewest updates the rule accepts (before anomaly exclusion)."""
        if self.rule in ("krum", "multi_krum"):
            return 2 * self.f + 3
        if self.rule in ("median", "trimmed_mean"):
            return 2 * self.f + 1
        return 1


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """``params``: the new global model (declared dtypes); ``digest``: its :func:`aggregate_hash`;
    ``used``/``flagged``: digests of the updates aggregated / excluded as anomalous, in hash order;
    ``senders_credited``: senders whose whole update makes up the result (all used ones for
    FedAvg and reputation_clipped, the chosen ones for Krum / Multi-Krum, none for the
    coordinate-wise median and trimmed mean, which take some coordinates of every update:
    they cannot tell an attacker from an honest peer, so they credit nobody); only these earn
    an ``update_good`` reputation observation;
    ``error``: why the rule could not run (then ``params`` is the base model)."""

    params: dict[str, np.ndarray]
    digest: bytes
    used: tuple[bytes, ...]
    flagged: tuple[bytes, ...]
    senders_used: tuple[str, ...]
    senders_credited: tuple[str, ...]
    senders_flagged: tuple[str, ...]
    anomaly: AnomalyReport | None = None
    error: str | None = None


def combine(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray, config: AggregationConfig) -> np.ndarray:
    """Apply ``config.rule`` to deltas ``X`` ``(n, d)``; returns ``(d,)`` float64.

    Raises:
        AggregationError: the rule's precondition fails.
    """
    return _combine(X, samples, reputation, config)[0]


def _combine(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray,
             config: AggregationConfig) -> tuple[np.ndarray, list[int], list[int] | None]:
    """The rule's result, the rows it rejected as outliers (reputation_clipped's filter) and the
    rows whose whole update makes up the result (Krum's choice; every kept row for FedAvg and
    reputation_clipped; None for the coordinate-wise rules, which take a few coordinates of
    every row and so credit no row as a whole)."""
    rule, f = config.rule, config.f
    rows = list(range(X.shape[0]))
    if rule == "fedavg":
        return fedavg(X, samples, reputation), [], rows
    if rule == "median":
        return coordinate_median(X, f), [], None
    if rule == "trimmed_mean":
        return trimmed_mean(X, f), [], None
    if rule == "krum":
        chosen = krum_select(X, f, 1)
        return X[chosen[0]].copy(), [], chosen
    if rule == "multi_krum":
        m = config.multi_krum_m if config.multi_krum_m is not None else X.shape[0] - f
        chosen = krum_select(X, f, min(m, X.shape[0]))
        return fedavg(X[chosen], samples[chosen], reputation[chosen]), [], sorted(chosen)
    delta, rejected = _reputation_clipped(X, samples, reputation, config.clip_cutoff)
    return delta, rejected, [i for i in rows if i not in set(rejected)]


def aggregate(updates: Sequence[Update], spec: ModelSpec, config: AggregationConfig,
              base: Mapping[str, np.ndarray] | None = None) -> AggregateResult:
    """Aggregate validated updates into a new global model, deterministically.

    Args:
        updates: updates of distinct digests, already checked with :func:`validate_update`.
        spec: the job's model spec.
        config: rule, f and anomaly settings.
        base: the round's global model (``None``: zeros, i.e. aggregate the parameters).
    Returns:
        :class:`AggregateResult`. If the rule's precondition fails (after
        anomaly exclusion), ``error`` says why and ``params`` is ``base``: the
        same outcome on every peer.
    Raises:
        AggregationError: two updates with the same digest.
        LocalProtocolError: an update does not match ``spec``.
    """
    ordered = _ordered(updates)
    base = base if base is not None else spec.zeros()
    base_vec = spec.flatten(base)
    digests = [u.digest for u in ordered]
    X = np.empty((len(ordered), spec.size), dtype=np.float64)
    for i, u in enumerate(ordered):
        X[i] = spec.flatten(u.params)
        X[i] -= base_vec
    samples = np.array([u.num_samples for u in ordered], dtype=np.float64)
    reputation = np.array([u.weight for u in ordered], dtype=np.float64)
    report = None
    keep = list(range(len(ordered)))
    if config.detect:
        report = detect_anomalies(X, digests, np.array([u.loss_change for u in ordered]),
                                  z_threshold=config.z_threshold, n_estimators=config.iforest_estimators,
                                  random_state=config.random_state)
        keep = [i for i in keep if digests[i] not in report.flagged]
    flagged_set = set(report.flagged) if report is not None else set()
    error = None
    credited: list[int] = []
    try:
        if len(keep) < config.min_updates():
            raise AggregationError(f"{config.rule} needs >= {config.min_updates()} updates, has {len(keep)}")
        delta, rejected, whole = _combine(X[keep], samples[keep], reputation[keep], config)
        flagged_set.update(digests[keep[j]] for j in rejected)
        credited = [keep[j] for j in whole] if whole is not None else []
        keep = [i for i in keep if digests[i] not in flagged_set]
        params = spec.unflatten(base_vec + delta)
    except AggregationError as exc:
        error = str(exc)
        params = spec.unflatten(base_vec)
    flagged = tuple(d for d in digests if d in flagged_set)
    by_digest = {u.digest: u for u in ordered}
    used = tuple(digests[i] for i in keep) if error is None else ()
    credited_digests = {digests[i] for i in credited} if error is None else set()
    return AggregateResult(params=params, digest=aggregate_hash(params, spec), used=used, flagged=flagged,
                           senders_used=tuple(by_digest[d].sender for d in used),
                           senders_credited=tuple(by_digest[d].sender for d in used if d in credited_digests),
                           senders_flagged=tuple(by_digest[d].sender for d in flagged),
                           anomaly=report, error=error)

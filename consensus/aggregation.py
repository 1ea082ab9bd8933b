"""Aggregation maths for federated averaging rounds (pure; numpy + scikit-learn).

Every peer of a round computes the aggregate itself from the committed
inclusion set, so the functions here are written to give **bitwise identical**
results on every peer given the same inputs, whatever its CPU or BLAS (the
anomaly screen: with the same scikit-learn version):

* updates are put in a fixed order, ascending by their 32-byte update hash
  (:attr:`Update.digest`), never in arrival order;
* every tensor is flattened in a fixed order (tensor names sorted) to one
  float64 vector; every arithmetic step is an element-wise IEEE-754 float64
  operation (correctly rounded, no fused multiply-add) in an order fixed
  here, never a BLAS call (``np.dot``, ``@``, ``einsum``: their summation
  order depends on the CPU, the BLAS build and the thread count). Two
  reductions are used, both specified bit for bit (docs/PROTOCOL.md §17.7):

  - across updates (rows, ``n`` values): :func:`sequential_sum`, left to
    right in update-hash order starting from 0.0 (``_weighted_sum`` does it
    per coordinate: ``acc = acc + w_i * x_i``);
  - within a vector (``d`` values: squared norms, dot products, distances):
    :func:`tree_sum`, a fixed pairwise halving tree, vectorised with
    element-wise adds only;

  sorts are stable; medians are the middle value, or ``(lower + upper) / 2``
  for an even count;
* the anomaly detector uses a fixed ``random_state`` and one thread (its
  outlier test is scikit-learn's ``IsolationForest``: reproducible with the
  same scikit-learn version, not specified beyond that).

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
  reputation weight). Assumes ``f = 0``: **not robust**. One arbitrary update
  moves the result arbitrarily far, and the sample counts are self-reported
  and trusted without bound (one update claiming ``2**40`` samples is the
  whole result). The only rule that weights by the sample count as reported.
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
  the plain (unweighted) mean of the ``m`` lowest-scored ones (default
  ``m = n - f``), as in the paper (§5: "selects m ... vectors with the best
  scores, and outputs their average"): neither sample counts nor reputation
  weights enter Krum or Multi-Krum, so a selected byzantine update moves the
  result by at most ``1/m`` of its distance. Needs ``n > 2f + 2`` (raises
  otherwise).
* ``"reputation_clipped"`` (this project's rule; see
  :func:`reputation_clipped_mean`): distance filter and centered clipping around the
  reputation-weighted coordinate-wise median, then a reputation x (capped)
  sample weighted mean (sample counts capped at their median, so an inflated
  count buys at most the median's weight). Assumes the byzantine updates hold
  **less than half of the reputation weight** of the round (not of the count): the center and the
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
``update_flagged`` reputation observations against their senders; credited ones
as ``update_good`` (:class:`~chimera.consensus.reputation.ObservationKind`).
**Exception**: when excluding the flagged updates would leave fewer than the
rule's minimum for ``f`` (:meth:`AggregationConfig.min_updates`, e.g. Krum
with ``f = 1`` and ``n = 5``), nothing is excluded: the rule runs on every
update with the same ``f`` (it tolerates ``f`` byzantine updates by itself;
``f`` is not lowered by the number flagged, since a flagged update may be
honest) and :attr:`AggregateResult.screen_skipped` is True. The flagged
updates are still reported in ``flagged`` (``update_flagged``) and are never
credited. Without this, flagging the one attacker at the rule's minimum
made the round fail and keep the old model.

Errors
------
* :class:`UpdateRejected` (a :class:`~chimera.protocol.errors.RemoteProtocolError`,
  reason ``"bad_update"``): an update from a peer has wrong names, shapes or
  dtypes, non-finite values (NaN, +-inf; raised by :func:`validate_update`,
  and by :func:`aggregate` / :func:`combine` for an update or delta that is
  not finite), or a delta norm above the bound. Callers turn it into a
  counted drop, never a crash.
* :class:`AggregationError` (a :class:`~chimera.protocol.errors.LocalProtocolError`):
  the rule's precondition on ``n`` and ``f`` does not hold, an unknown rule,
  no update with positive weight, or a result that is not finite (float64
  overflow, e.g. FedAvg with huge sample counts). Deterministic: every peer given the same
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
        num_samples: local training samples (1 … 2**64 − 1, as on the wire; self-reported).
        weight: the sender's committed reputation weight for the round (> 0, finite).
        digest: 32-byte update hash (orders updates; see ``training.update_hash``).
            Empty: computed as SHA-256 of sender, sample count and :func:`canonical_bytes`.
        loss_before: local loss of the base model on the sender's data (>= 0), if reported.
        loss_after: local loss after local training (>= 0), if reported.
    Raises:
        LocalProtocolError: ``num_samples`` outside 1 … 2**64 − 1 or ``weight`` not finite and > 0.

    ``params`` is not checked here (see :func:`validate_update`); :func:`aggregate`
    raises :class:`UpdateRejected` for an update with a non-finite value.
    ``num_samples`` is trusted as reported only by FedAvg (see the module docstring).
    """

    sender: str
    params: Mapping[str, np.ndarray]
    num_samples: int
    weight: float = 1.0
    digest: bytes = b""
    loss_before: float | None = None
    loss_after: float | None = None

    def __post_init__(self) -> None:
        if type(self.num_samples) is not int or not 1 <= self.num_samples < 1 << 64:
            raise LocalProtocolError("num_samples must be an int in 1..2**64-1 (the wire's bound)")
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
    shape and dtype, all values finite, and the delta's L2 norm at most
    ``max_norm``. The norm is ``sqrt(tree_sum(v * v))`` with ``v`` the
    ``(d,)`` float64 delta ``flatten(params) - flatten(base)`` (tensors in
    name order): bit for bit the same on every peer (no BLAS), so every peer
    accepts or rejects an update at the bound alike; it equals the first
    anomaly feature (:func:`update_features`).

    Raises:
        UpdateRejected: on the first failed check (message names the tensor).
        LocalProtocolError: ``base`` does not match ``spec``.
    """
    if set(params) != set(spec.names):
        raise UpdateRejected(f"tensors {sorted(params)[:8]} differ from {list(spec.names)[:8]}")
    for t in spec.tensors:
        array = params[t.name]
        if not isinstance(array, np.ndarray) or array.shape != t.shape or array.dtype != DTYPES[t.dtype]:
            raise UpdateRejected(f"tensor {t.name}: not an array of shape {t.shape} and dtype {t.dtype}")
        if not np.isfinite(array).all():
            raise UpdateRejected(f"tensor {t.name}: non-finite values")
    delta = spec.flatten(params)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an infinite norm: rejected
        if base is not None:
            delta -= spec.flatten(base)
        norm = math.sqrt(tree_sum(delta * delta))
    if not math.isfinite(norm):  # a delta above ~1e154 squares past float64
        raise UpdateRejected("update norm overflows float64 (values of magnitude above ~1e154)")
    if norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} above the bound {max_norm:.4g}")
    return norm


# ------------------------------------------------------------------ reductions

_BLOCK_ELEMENTS = 1 << 22
"""Rows per chunk of a row-wise reduction: temporaries stay near 32 MiB of float64."""


def sequential_sum(values: np.ndarray | Sequence[float]) -> float:
    """Sum of a short float64 vector (one value per update), left to right from 0.0.

    ``s = 0.0; for v in values: s = s + v`` (each addition rounded to float64).
    Used for every sum over updates (weights, Krum scores); ``(n,)`` -> float.
    """
    total = 0.0
    for value in np.asarray(values, dtype=np.float64).ravel().tolist():
        total += value
    return total


def _tree_sum_last(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """:func:`tree_sum` along the last axis of ``a`` (``b`` given: of the element-wise
    product ``a * b``, ``b`` broadcastable): ``(..., k)`` -> ``(...)`` float64.

    The first level is fused with the products; every value is the same as
    :func:`tree_sum` of the materialised products."""
    k = a.shape[-1]
    if k == 0:
        return np.zeros(a.shape[:-1], dtype=np.float64)
    if k == 1:
        return np.array(a[..., 0] if b is None else a[..., 0] * b[..., 0], dtype=np.float64)
    half = 1 << ((k - 1).bit_length() - 1)  # W / 2, W = smallest power of two >= k
    if b is None:
        s = np.array(a[..., :half], dtype=np.float64)
        s[..., :k - half] += a[..., half:k]  # partners past the end: the value is carried unchanged
    else:
        s = np.multiply(a[..., :half], b[..., :half], dtype=np.float64)
        s[..., :k - half] += a[..., half:k] * b[..., half:k]
    while half > 1:
        half //= 2
        s = s[..., :half] + s[..., half:]
    return s[..., 0]


def tree_sum(values: np.ndarray) -> float:
    """Sum of a float64 vector ``(k,)`` by a fixed pairwise halving tree (deterministic, no BLAS).

    Let ``W`` be the smallest power of two >= ``k`` (``k = 0``: 0.0; ``k = 1``:
    the value). Level one: ``y[j] = x[j] + x[j + W/2]`` for ``j + W/2 < k``, else
    ``y[j] = x[j]``, for ``j < W/2``; then while more than one value is left:
    ``y[j] = y[j] + y[j + len/2]`` for ``j < len/2``. The result is ``y[0]``.
    Every addition is one element-wise float64 add, so the result is the same
    bit for bit on every CPU (unlike ``np.dot``/``einsum``, whose order depends
    on SIMD width, BLAS build and threads); error grows like ``log2(k)``.
    Used for every sum over the ``d`` coordinates of a vector (squared norms,
    dot products, squared distances).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise LocalProtocolError("tree_sum takes a 1-d vector")
    return float(_tree_sum_last(v))


def row_dots(X: np.ndarray, v: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` float64: ``tree_sum(X[i] * v)`` per row of ``(n, d)`` ``X`` (``v`` ``(d,)``;
    ``None``: ``X[i] * X[i]``, the squared norms). Products are element-wise, then
    :func:`tree_sum`; rows are processed in chunks of about 32 MiB."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(1, d))
    for start in range(0, n, block):
        rows = X[start:start + block]
        out[start:start + rows.shape[0]] = _tree_sum_last(rows, rows if v is None else v)
    return out


# ------------------------------------------------------------------ primitives


def _ordered(updates: Sequence[Update]) -> list[Update]:
    ordered = sorted(updates, key=lambda u: u.digest)
    for a, b in zip(ordered, ordered[1:]):
        if a.digest == b.digest:
            raise AggregationError("the same update (hash) appears twice")
    return ordered


def _weighted_sum(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_i weights[i] * X[i]`` accumulated row by row in float64 (fixed order):
    ``acc = 0; acc = acc + weights[i] * X[i]`` for ``i = 0, 1, ...`` (rows of weight 0
    skipped), each product and sum rounded element-wise."""
    acc = np.zeros(X.shape[1], dtype=np.float64)
    for i in range(X.shape[0]):
        if weights[i] != 0.0:
            acc += weights[i] * X[i]
    return acc


def fedavg(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray) -> np.ndarray:
    """FedAvg (McMahan et al. 2017) times reputation: ``sum(a_i x_i) / sum(a_i)``, ``a_i = n_i * r_i``.

    ``a_i`` is the float64 product; the numerator is :func:`_weighted_sum` (rows
    in order), the denominator :func:`sequential_sum` of ``a``.

    Args:
        X: ``(n, d)`` float64 deltas (rows in update-hash order).
        samples: ``(n,)`` sample counts (>= 1).
        reputation: ``(n,)`` reputation weights (> 0).
    Returns:
        ``(d,)`` float64. Assumption on f: f = 0 (**not robust**): one update
        moves the result arbitrarily far, and the self-reported sample counts
        are trusted without bound (an update claiming ``2**40`` samples is the
        result). Use a robust rule where peers may lie.
    Raises:
        AggregationError: no rows, or a total weight that is not finite and > 0.
    """
    a = np.asarray(samples, dtype=np.float64) * np.asarray(reputation, dtype=np.float64)
    total = sequential_sum(a)
    if X.shape[0] == 0 or not (total > 0 and math.isfinite(total)):
        raise AggregationError("FedAvg needs at least one update with positive (finite) weight")
    return _weighted_sum(X, a) / total


def coordinate_median(X: np.ndarray, f: int = 0) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018) of ``(n, d)`` float64 -> ``(d,)`` float64.

    Odd ``n``: the middle value; even ``n``: ``(lower + upper) / 2`` of the two middle
    values. Robust while ``f < n / 2``.
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
        ``(d,)`` float64, within the honest values' range per coordinate when at most f are byzantine:
        per coordinate, the kept values in ascending order summed left to right
        (:func:`_weighted_sum` with weights 1), divided by ``n - 2f``.
    Raises:
        AggregationError: ``n <= 2f``.
    """
    n = X.shape[0]
    if f < 0 or n <= 2 * f:
        raise AggregationError(f"the trimmed mean needs n > 2f updates (n={n}, f={f})")
    S = np.sort(X, axis=0, kind="stable")[f:n - f]
    return _weighted_sum(S, np.ones(S.shape[0])) / S.shape[0]


def pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    """``(n, n)`` float64 squared L2 distances: ``D[i, j] = D[j, i] = tree_sum((x_j - x_i)**2)``
    for ``i < j`` (element-wise differences and squares, :func:`tree_sum`; deterministic)."""
    n, d = X.shape
    D = np.zeros((n, n), dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(1, d))  # rows per chunk: temporaries stay near 32 MiB
    for i in range(n - 1):
        for j in range(i + 1, n, block):
            diff = X[j:j + block] - X[i]
            row = _tree_sum_last(diff, diff)
            D[i, j:j + len(row)] = row
            D[j:j + len(row), i] = row
    return D


def krum_scores(X: np.ndarray, f: int) -> np.ndarray:
    """Krum scores (Blanchard et al. 2017): for each i the sum of its ``n - f - 2`` smallest
    squared distances to other updates (:func:`pairwise_sq_distances`; the ``n - 1``
    distances sorted ascending, the first ``n - f - 2`` summed left to right,
    :func:`sequential_sum`). ``(n,)`` float64.

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
        scores[i] = sequential_sum(others[:k])
    return scores


def krum_select(X: np.ndarray, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` lowest Krum scores (ties: lower index, i.e. smaller update hash).

    With ``n > 2f + 2`` and at most f byzantine rows, Krum's choice is
    (Blanchard et al. 2017, Prop. 1) close to the honest mean; a far outlier
    never has the lowest score. Returned in ascending index order.
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

    Per coordinate: ``c_k`` = the weights in that sorted order summed left to
    right up to ``k`` (float64); the result is the value at the first ``k``
    with ``2 * c_k >= c_{n-1}`` (the total summed in the same order, so the
    last value always qualifies).

    If the rows of weight strictly below half the total are arbitrary, each
    coordinate of the result lies within the range of the other rows.
    Raises:
        AggregationError: no rows.
    """
    if X.shape[0] == 0:
        raise AggregationError("the weighted median needs at least one row")
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(X, axis=0, kind="stable")
    cum = np.cumsum(w[order], axis=0)
    idx = np.argmax(2.0 * cum >= cum[-1], axis=0)
    return np.take_along_axis(X, order, axis=0)[idx, np.arange(X.shape[1])]


def reputation_clipped_mean(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray,
                            cutoff: float = 4.0) -> np.ndarray:
    """This project's reputation-weighted robust rule: filtered, centered clipping around a
    reputation-weighted coordinate-wise median.

    Steps (all float64, rows in update-hash order):

    1. center ``c``: coordinate-wise weighted median of the rows with weights ``r_i``
       (reputation only: sample counts are self-reported and could be inflated);
    2. radius ``tau``: weighted median (weights ``r_i``, as in 1.) of the distances
       ``d_i = sqrt(tree_sum((x_i - c)**2))``;
    3. filter: rows with ``d_i > cutoff * tau`` get no weight (far outliers, e.g. scaled updates);
    4. clip: ``y_i = c + (x_i - c) * min(1, tau / d_i)``;
    5. result: ``sum(a_i y_i) / sum(a_i)`` over the kept rows with
       ``a_i = r_i * min(n_i, median(n))`` (sample counts capped at the median count,
       so an inflated count gains nothing above it); numerator
       ``acc = acc + a_i * (c + (x_i - c) * s_i)`` row by row, ``s_i = 1`` if
       ``d_i <= tau`` or ``d_i == 0`` else ``tau / d_i``; denominator summed left to
       right over the kept rows.

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
    if n == 0 or not sequential_sum(r) > 0:
        raise AggregationError("the reputation-clipped mean needs an update with positive weight")
    center = weighted_coordinate_median(X, r)
    dist = np.sqrt(row_dots(X - center))
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(r[order])
    tau = float(dist[order][int(np.argmax(2.0 * cum >= cum[-1]))])
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
    The mean absolute deviation is summed row by row in order (:func:`_weighted_sum`)
    and divided by ``n``.
    Returns ``(n, k)`` float64 >= 0.
    """
    med = np.median(values, axis=0)
    dev = values - med
    mad = np.maximum(np.median(np.abs(dev), axis=0), min_relative_scale * np.abs(med))
    mean_ad = _weighted_sum(np.abs(dev), np.ones(values.shape[0])) / values.shape[0]
    z = np.zeros_like(values, dtype=np.float64)
    for j in range(values.shape[1]):
        if mad[j] > 0:
            z[:, j] = 0.6745 * dev[:, j] / mad[j]
        elif mean_ad[j] > 0:
            z[:, j] = 0.7979 * dev[:, j] / mean_ad[j]
    return np.maximum(z, 0.0)


def update_features(X: np.ndarray, loss_change: np.ndarray) -> np.ndarray:
    """``(n, 3)`` float64 features: delta norm, cosine distance to the coordinate-wise
    median delta (1 when either vector is zero, 0 when both are), loss change.

    With ``m`` the coordinate-wise median of ``X`` ``(n, d)``: norm
    ``|x_i| = sqrt(tree_sum(x_i * x_i))`` (as :func:`validate_update`), cosine
    distance ``1 - tree_sum(x_i * m) / (|x_i| * |m|)``: element-wise products and
    :func:`tree_sum`, no BLAS, so every peer flags alike."""
    med = np.median(X, axis=0)
    med_norm = math.sqrt(tree_sum(med * med))
    norms = np.sqrt(row_dots(X))
    dots = row_dots(X, med)
    cos_dist = np.empty(X.shape[0], dtype=np.float64)
    for i in range(X.shape[0]):
        if norms[i] == 0.0 and med_norm == 0.0:
            cos_dist[i] = 0.0
        elif norms[i] == 0.0 or med_norm == 0.0:
            cos_dist[i] = 1.0
        else:
            cos_dist[i] = 1.0 - float(dots[i]) / (float(norms[i]) * med_norm)
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


def screen_library_version() -> str:
    """The scikit-learn version installed here (``sklearn.__version__``).

    The anomaly screen's ``IsolationForest`` is reproducible only with the same
    scikit-learn version (PROTOCOL.md §17.7), so a job with ``detect_anomalies``
    records its proposer's (``JobSpec.sklearn_version``) and a driver passes its own
    to the round core (``TrainingConfig.sklearn_version``): a peer with another
    version does not check or confirm that job's aggregates.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    import sklearn

    return str(sklearn.__version__)


# -------------------------------------------------------------------- aggregate


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    """How a round aggregates (identical on every peer: part of the committed job).

    Args:
        rule: one of :data:`RULES`.
        f: byzantine updates assumed (>= 0); used by median, trimmed mean, Krum.
        multi_krum_m: updates Multi-Krum averages (``None``: ``n - f``; more than ``n``: ``n``).
        detect: run :func:`detect_anomalies` and exclude flagged updates first (unless
            fewer than :meth:`min_updates` would be left; see the module docstring).
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
        """Fewest updates the rule accepts for ``f``: Krum / Multi-Krum ``2f + 3``, median and
        trimmed mean ``2f + 1``, FedAvg and reputation_clipped 1. The anomaly screen's
        exclusion is skipped when it would leave fewer (:attr:`AggregateResult.screen_skipped`)."""
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
    they cannot tell an attacker from an honest peer, so they credit nobody; a flagged update
    is never credited); only these earn an ``update_good`` reputation observation;
    ``error``: why the rule could not run (then ``params`` is the base model);
    ``screen_skipped``: the anomaly screen flagged updates but excluding them would have
    left fewer than :meth:`AggregationConfig.min_updates`, so the rule ran on every update
    (with the same ``f``): the screen's flagged updates are then in ``flagged`` (their
    senders get ``update_flagged``) **and** in ``used`` (the rule saw them)."""

    params: dict[str, np.ndarray]
    digest: bytes
    used: tuple[bytes, ...]
    flagged: tuple[bytes, ...]
    senders_used: tuple[str, ...]
    senders_credited: tuple[str, ...]
    senders_flagged: tuple[str, ...]
    anomaly: AnomalyReport | None = None
    error: str | None = None
    screen_skipped: bool = False


def combine(X: np.ndarray, samples: np.ndarray, reputation: np.ndarray, config: AggregationConfig) -> np.ndarray:
    """Apply ``config.rule`` to deltas ``X`` ``(n, d)`` float64 (rows in update-hash order)
    with ``samples`` and ``reputation`` ``(n,)``; returns ``(d,)`` float64. No anomaly screen.

    Raises:
        UpdateRejected: ``X`` has a non-finite value.
        AggregationError: the rule's precondition fails.
    """
    X = np.asarray(X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise UpdateRejected("an update (row of X) has non-finite values")
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
        # Blanchard et al. 2017, §5: the plain average of the m best-scored vectors. Weighting
        # by the self-reported sample counts let one selected byzantine update claiming 2**40
        # samples become the whole result.
        m = config.multi_krum_m if config.multi_krum_m is not None else X.shape[0] - f
        chosen = krum_select(X, f, min(m, X.shape[0]))  # ascending
        return _weighted_sum(X[chosen], np.ones(len(chosen))) / len(chosen), [], chosen
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
        :class:`AggregateResult`. If the rule's precondition fails, ``error``
        says why and ``params`` is ``base``: the same outcome on every peer. The
        anomaly screen's exclusion never causes that: when it would leave fewer
        than :meth:`AggregationConfig.min_updates` updates, the rule runs on all
        of them (``screen_skipped``). A result that is not finite (float64
        overflow) is such an error too.
    Raises:
        AggregationError: two updates with the same digest.
        UpdateRejected: an update has a non-finite value (NaN, +-inf), or its
            delta to ``base`` overflows float64 (message names the sender).
        LocalProtocolError: an update does not match ``spec``, or ``base`` has a
            non-finite value.
    """
    ordered = _ordered(updates)
    base = base if base is not None else spec.zeros()
    base_vec = spec.flatten(base)
    if not np.isfinite(base_vec).all():
        raise LocalProtocolError("the base model has non-finite values")
    digests = [u.digest for u in ordered]
    X = np.empty((len(ordered), spec.size), dtype=np.float64)
    for i, u in enumerate(ordered):
        row = spec.flatten(u.params)
        if not np.isfinite(row).all():
            raise UpdateRejected(f"update from {str(u.sender)[:64]!r}: non-finite values")
        with np.errstate(over="ignore"):
            np.subtract(row, base_vec, out=X[i])
        if not np.isfinite(X[i]).all():
            raise UpdateRejected(f"update from {str(u.sender)[:64]!r}: its delta to the base model overflows")
    samples = np.array([u.num_samples for u in ordered], dtype=np.float64)
    reputation = np.array([u.weight for u in ordered], dtype=np.float64)
    report = None
    keep = list(range(len(ordered)))
    screen_skipped = False
    if config.detect:
        report = detect_anomalies(X, digests, np.array([u.loss_change for u in ordered]),
                                  z_threshold=config.z_threshold, n_estimators=config.iforest_estimators,
                                  random_state=config.random_state)
        screened = [i for i in keep if digests[i] not in report.flagged]
        if len(screened) < config.min_updates() <= len(keep):
            # Excluding the flagged would leave too few for f: run the rule on all of them with
            # the same f (it tolerates f byzantine updates itself; a flagged update may be honest,
            # so f is not lowered). Failing the round here let one flagged attacker at the
            # rule's minimum keep the old model.
            screen_skipped = True
        else:
            keep = screened
    flagged_set = set(report.flagged) if report is not None else set()
    error = None
    credited: list[int] = []
    try:
        if len(keep) < config.min_updates():
            raise AggregationError(f"{config.rule} needs >= {config.min_updates()} updates, has {len(keep)}")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the error below
            delta, rejected, whole = _combine(X[keep], samples[keep], reputation[keep], config)
        rejected_set = {digests[keep[j]] for j in rejected}
        flagged_set |= rejected_set
        credited = [keep[j] for j in whole] if whole is not None else []
        keep = [i for i in keep if digests[i] not in rejected_set]
        if not np.isfinite(delta).all():
            raise AggregationError(f"{config.rule}: the aggregate is not finite (float64 overflow)")
        with np.errstate(over="ignore"):
            params = spec.unflatten(base_vec + delta)
        if not all(np.isfinite(array).all() for array in params.values()):
            raise AggregationError(f"{config.rule}: the aggregate overflows its declared dtype")
    except AggregationError as exc:
        error = str(exc)
        params = spec.unflatten(base_vec)
    flagged = tuple(d for d in digests if d in flagged_set)
    by_digest = {u.digest: u for u in ordered}
    used = tuple(digests[i] for i in keep) if error is None else ()
    credited_digests = {digests[i] for i in credited} - flagged_set if error is None else set()
    return AggregateResult(params=params, digest=aggregate_hash(params, spec), used=used, flagged=flagged,
                           senders_used=tuple(by_digest[d].sender for d in used),
                           senders_credited=tuple(by_digest[d].sender for d in used if d in credited_digests),
                           senders_flagged=tuple(by_digest[d].sender for d in flagged),
                           anomaly=report, error=error, screen_skipped=screen_skipped)

"""A clean-room implementation of federated training (PROTOCOL.md §17).

Written from docs/PROTOCOL.md (§1, §2, §7, §14.2, §14.3, §15, §17) and
README.md alone, without reading the reference source. It imports nothing from
``chimera`` (tests/test_independent_training.py checks this) and uses only
numpy, msgpack, hashlib and the standard library: it is the proof that §17 is
enough to write a participant whose hashes, aggregates and round verdicts
match the reference bit for bit.

What it covers:

- §17.1: model hash, update hash, local seed; the zero model of a job.
- §17.2: the training log values (``fl_job``, ``fl_include``, ``fl_confirm``),
  their canonical encoding, strict decoding, job id and inclusion hash.
- §17.7: the reductions (``seq``, ``tree``, ``wsum``, ``norm``, ``median``,
  ``wmed``), update validation, the six rules and the anomaly screen's
  features and z-scores (the IsolationForest step is specified only by
  scikit-learn, so the caller passes the outlier mask; see ``screen``).
- §17.4 steps 1, 3 and 5 as pure functions of the committed log: where each
  round starts and with which epoch, which inclusion counts, and the hash and
  point at which each round is certified (``follow_job``).

Ed25519 is not in the standard library: ``follow_job`` takes a
``verify(public_key, message, signature) -> bool`` callable.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np

# ---------------------------------------------------------------- constants

PARAMS_DOMAIN = "chimera-mesh/fl-params/v1"
UPDATE_DOMAIN = b"chimera-mesh/fl-update/v1\x00"
SEED_DOMAIN = b"chimera-mesh/fl-seed/v1\x00"
INCLUDE_DOMAIN = b"chimera-mesh/fl-include/v1\x00"
VOTE_DOMAIN = b"chimera-mesh/vote/v1\x00"
MAX_VALUE_BYTES = 4096
MAX_ROUNDS = 10 ** 6  # bound of every `round` field (fl_job.rounds)
MAX_HELD_CONFIRMS_PER_VOTER = 4  # §17.4 step 5: a participant's confirms held before they can count
RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "reputation_clipped")
MODEL_KINDS = ("sgd_classifier", "sgd_regressor")
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


class SpecError(ValueError):
    """A value that §17 says is invalid (bad bounds, not canonical, ...)."""


class UpdateRejected(ValueError):
    """§17.7: an update with a non-finite value or a delta over the bound."""


def pack(obj: Any) -> bytes:
    """Canonical msgpack (§14.2): shortest ints, bin for bytes, float64."""
    return msgpack.packb(obj, use_bin_type=True)


def rule_minimum(rule: str, f: int) -> int:
    """§17.7 table: the fewest updates `rule` runs on, for byzantine_f = f."""
    if rule in ("fedavg", "reputation_clipped"):
        return 1
    if rule in ("median", "trimmed_mean"):
        return 2 * f + 1
    if rule in ("krum", "multi_krum"):
        return 2 * f + 3
    raise SpecError(f"unknown rule {rule!r}")


# ---------------------------------------------------------------- §17.1

Tensors = Mapping[str, np.ndarray]


def _check_tensor(name: str, arr: np.ndarray) -> np.ndarray:
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise SpecError(f"tensor name {name!r}: 1..64 characters")
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
        raise SpecError(f"tensor {name}: dtype {arr.dtype} is not float32/float64")
    if arr.ndim > 8:
        raise SpecError(f"tensor {name}: {arr.ndim} dims > 8")
    # np.ascontiguousarray would turn a 0-d tensor (shape []) into shape [1]
    return np.asarray(arr, dtype=DTYPES[dtype_name(arr)]).copy(order="C")


def dtype_name(arr: np.ndarray) -> str:
    return "float32" if arr.dtype.itemsize == 4 else "float64"


def model_hash(tensors: Tensors) -> bytes:
    """§17.1 model hash (``aggregate_hash``): 32 bytes.

    SHA-256 of msgpack([PARAMS_DOMAIN, [[name, dtype, [dims], raw], ...]]),
    tensors in name order, raw little-endian C-order bytes. Raises SpecError
    for more than 64 tensors or a tensor §17.1 does not allow.
    """
    if len(tensors) > 64:
        raise SpecError("more than 64 tensors")
    items = []
    for name in sorted(tensors):
        arr = _check_tensor(name, np.asarray(tensors[name]))
        items.append([name, dtype_name(arr), [int(x) for x in arr.shape], arr.tobytes()])
    return hashlib.sha256(pack([PARAMS_DOMAIN, items])).digest()


def model_spec(model_kind: str, n_features: int, classes: Sequence[int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """§17.1 table: name -> (shape, dtype) of a job's model."""
    if model_kind == "sgd_classifier":
        distinct = len(set(classes))
        if distinct < 2:
            raise SpecError("a classifier needs >= 2 distinct classes")
        k = 1 if distinct == 2 else distinct
        return {"coef": ((k, n_features), "float64"), "intercept": ((k,), "float64")}
    if model_kind == "sgd_regressor":
        return {"coef": ((n_features,), "float64"), "intercept": ((1,), "float64")}
    raise SpecError(f"unknown model_kind {model_kind!r}")


def zero_model(spec: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """§17.1: the round-0 model, all zeros."""
    return {name: np.zeros(shape, dtype=DTYPES[dt]) for name, (shape, dt) in sorted(spec.items())}


def fl_tensor_map(name: str, arr: np.ndarray) -> dict:
    """§17.3 FlTensor as a canonical map (name, dtype, shape, data)."""
    arr = _check_tensor(name, np.asarray(arr))
    return {"name": name, "dtype": dtype_name(arr), "shape": [int(x) for x in arr.shape],
            "data": arr.tobytes()}


def update_body(job_id: bytes, round_: int, epoch: int, sender: str, tensors: Tensors,
                num_samples: int, loss_before: float = 0.0, loss_after: float = 0.0,
                accuracy: float = 0.0) -> dict:
    """§17.3 ``fl_update`` map without its signature, fields in table order."""
    return {
        "job_id": bytes(job_id), "round": int(round_), "epoch": int(epoch), "sender": sender,
        "tensors": [fl_tensor_map(n, tensors[n]) for n in sorted(tensors)],
        "num_samples": int(num_samples), "loss_before": float(loss_before),
        "loss_after": float(loss_after), "accuracy": float(accuracy),
    }


def update_hash(body: Mapping[str, Any]) -> bytes:
    """§17.1 update hash: SHA-256(UPDATE_DOMAIN || canonical msgpack of the map
    without ``signature``)."""
    m = {k: v for k, v in body.items() if k != "signature"}
    return hashlib.sha256(UPDATE_DOMAIN + pack(m)).digest()


def local_seed(job_id: bytes, round_: int, job_seed: int, peer_id: str) -> int:
    """§17.1 local seed: first 4 bytes (big endian) of SHA-256 over the
    domain, job id, round (u64 BE), job seed (u64 BE) and the peer id."""
    h = hashlib.sha256(SEED_DOMAIN + bytes(job_id) + int(round_).to_bytes(8, "big")
                       + int(job_seed).to_bytes(8, "big") + peer_id.encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big")


def inclusion_hash(update_hashes: Iterable[bytes]) -> bytes:
    """§17.2: SHA-256(INCLUDE_DOMAIN || ascending hashes concatenated)."""
    return hashlib.sha256(INCLUDE_DOMAIN + b"".join(sorted(bytes(h) for h in update_hashes))).digest()


def vote_bytes(purpose: str, network_id: bytes, epoch: int, statement: list) -> bytes:
    """§14.2 signed statement bytes."""
    return VOTE_DOMAIN + pack([purpose, bytes(network_id), int(epoch), statement])


def peer_public_key(peer_id: str) -> bytes:
    """§2: the Ed25519 public key a canonical peer id encodes."""
    if not isinstance(peer_id, str) or len(peer_id) != 52 or peer_id != peer_id.lower():
        raise SpecError(f"not a canonical peer id: {peer_id!r}")
    try:
        raw = base64.b32decode(peer_id.upper() + "====")
    except (ValueError, TypeError) as exc:
        raise SpecError(f"not a canonical peer id: {peer_id!r}") from exc
    if base64.b32encode(raw).decode().rstrip("=").lower() != peer_id:
        raise SpecError(f"not a canonical peer id: {peer_id!r}")
    return raw


# ---------------------------------------------------------------- §17.2 log values

_JOB_FIELDS = (
    # name, kind, default (None = required)
    ("name", "str64", None), ("model_kind", "str64", None), ("n_features", "int", None),
    ("classes", "classes", []), ("l2", "float", 1e-4), ("dataset", "str256", ""),
    ("rounds", "int", None), ("local_epochs", "int", 1), ("learning_rate", "float", None),
    ("rule", "str64", "fedavg"), ("byzantine_f", "int", 0), ("detect_anomalies", "bool", False),
    ("participants", "peers", None), ("quorum", "int", None), ("round_deadline_s", "float", None),
    ("max_update_norm", "float", 1e6), ("seed", "int", 0), ("sklearn_version", "str32", ""),
)
_REQUIRED = object()


@dataclass(frozen=True)
class Job:
    """A decoded ``fl_job`` (§17.2) and its id."""
    job_id: bytes
    fields: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode_job(**kw: Any) -> bytes:
    """The canonical ``fl_job`` value bytes for the given fields (defaults
    filled in; ``sklearn_version`` left out when empty)."""
    body = {}
    for name, _kind, default in _JOB_FIELDS:
        if name in kw:
            v = kw.pop(name)
        elif default is None:
            raise SpecError(f"fl_job: missing {name}")
        else:
            v = default
        if isinstance(v, tuple):
            v = list(v)
        if name in ("l2", "learning_rate", "round_deadline_s", "max_update_norm"):
            v = float(v)
        if name == "sklearn_version" and v == "":
            continue
        body[name] = v
    if kw:
        raise SpecError(f"fl_job: unknown fields {sorted(kw)}")
    raw = pack(["fl_job", body])
    decode_job(raw)  # bounds
    return raw


def _decode_value(raw: bytes) -> tuple[str, Any]:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_VALUE_BYTES:
        raise SpecError("value: not bytes or over 4096 bytes")
    try:
        obj = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True,
                              ext_hook=_no_ext, use_list=True)
    except SpecError:
        raise
    except Exception as exc:  # msgpack raises many types for bad input
        raise SpecError(f"value: not msgpack ({exc})") from exc
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], dict)):
        raise SpecError("value: not [tag, map]")
    return obj[0], obj[1]


def _no_ext(code: int, data: bytes) -> Any:
    raise SpecError("extension type")


def _check_canonical(raw: bytes, tag: str, body: dict, order: Sequence[str]) -> None:
    if list(body) != list(order) or pack([tag, body]) != bytes(raw):
        raise SpecError(f"{tag}: not canonical")


def decode_job(raw: bytes) -> Job:
    """Strictly decode an ``fl_job`` value (§17.2). Raises SpecError."""
    tag, body = _decode_value(raw)
    if tag != "fl_job":
        raise SpecError("not fl_job")
    known = {n for n, _k, _d in _JOB_FIELDS}
    if set(body) - known:
        raise SpecError(f"fl_job: unknown fields {sorted(set(body) - known)}")
    out: dict = {}
    order = []
    for name, kind, default in _JOB_FIELDS:
        if name not in body:
            if default is None:
                raise SpecError(f"fl_job: missing {name}")
            if name != "sklearn_version":
                raise SpecError(f"fl_job: {name} left out (not canonical)")
            out[name] = default
            continue
        order.append(name)
        v = body[name]
        if kind.startswith("str"):
            limit = int(kind[3:])
            if not isinstance(v, str) or len(v) > limit:
                raise SpecError(f"fl_job.{name}: str <= {limit}")
        elif kind == "int" and not _is_int(v):
            raise SpecError(f"fl_job.{name}: int")
        elif kind == "float":
            if _is_int(v) and abs(v) < 2 ** 53:
                v = float(v)
            if not isinstance(v, float) or not math.isfinite(v):
                raise SpecError(f"fl_job.{name}: finite float")
        elif kind == "bool" and not isinstance(v, bool):
            raise SpecError(f"fl_job.{name}: bool")
        elif kind == "classes":
            if not isinstance(v, list) or len(v) > 1024 or not all(_is_int(c) and 0 <= c <= 2 ** 31 for c in v):
                raise SpecError("fl_job.classes")
        elif kind == "peers":
            if not isinstance(v, list) or not 1 <= len(v) <= 64:
                raise SpecError("fl_job.participants: 1..64")
            for p in v:
                peer_public_key(p)
            if any(a >= b for a, b in zip(v, v[1:])):
                raise SpecError("fl_job.participants: sorted, distinct")
        if name == "sklearn_version" and v == "":
            raise SpecError("fl_job: an empty sklearn_version is left out (not canonical)")
        out[name] = v
    _check_canonical(raw, tag, body, order)
    if out["model_kind"] not in MODEL_KINDS:
        raise SpecError("fl_job.model_kind")
    if out["rule"] not in RULES:
        raise SpecError("fl_job.rule")
    checks = [
        (1 <= out["n_features"] <= 2 ** 20, "n_features"),
        (out["l2"] >= 0, "l2"), (1 <= out["rounds"] <= 10 ** 6, "rounds"),
        (1 <= out["local_epochs"] <= 10000, "local_epochs"),
        (out["learning_rate"] > 0, "learning_rate"), (0 <= out["byzantine_f"] <= 64, "byzantine_f"),
        (1 <= out["quorum"] <= len(out["participants"]), "quorum"),
        (out["quorum"] >= rule_minimum(out["rule"], out["byzantine_f"]), "quorum (rule minimum)"),
        (out["round_deadline_s"] > 0, "round_deadline_s"), (out["max_update_norm"] > 0, "max_update_norm"),
        (0 <= out["seed"] <= 2 ** 32 - 1, "seed"),
    ]
    for ok, what in checks:
        if not ok:
            raise SpecError(f"fl_job.{what} out of bounds")
    if out["model_kind"] == "sgd_classifier" and len(set(out["classes"])) < 2:
        raise SpecError("fl_job.classes: >= 2 distinct for a classifier")
    sv = out["sklearn_version"]
    if sv and (not out["detect_anomalies"] or not all(33 <= ord(c) <= 126 for c in sv)):
        raise SpecError("fl_job.sklearn_version")
    return Job(hashlib.sha256(bytes(raw)).digest(), out)


def _bin32(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != 32:
        raise SpecError(f"{what}: bin 32")
    return v


@dataclass(frozen=True)
class Inclusion:
    job_id: bytes
    round: int
    updates: tuple[bytes, ...]
    aggregate_hash: bytes


@dataclass(frozen=True)
class Confirm:
    job_id: bytes
    round: int
    inclusion_hash: bytes
    aggregate_hash: bytes
    voter: str
    signature: bytes


def encode_inclusion(job_id: bytes, round_: int, updates: Sequence[bytes], aggregate_hash: bytes) -> bytes:
    return pack(["fl_include", {"job_id": job_id, "round": round_,
                                "updates": sorted(updates), "aggregate_hash": aggregate_hash}])


def decode_inclusion(raw: bytes) -> Inclusion:
    """Strictly decode an ``fl_include`` value (§17.2). Raises SpecError."""
    tag, body = _decode_value(raw)
    if tag != "fl_include":
        raise SpecError("not fl_include")
    order = ("job_id", "round", "updates", "aggregate_hash")
    if set(body) != set(order):
        raise SpecError("fl_include: fields")
    if not _is_int(body["round"]) or not 1 <= body["round"] <= MAX_ROUNDS:
        raise SpecError("fl_include.round: 1 .. 10**6")
    ups = body["updates"]
    if not isinstance(ups, list) or len(ups) > 128:
        raise SpecError("fl_include.updates")
    ups = [_bin32(u, "fl_include.updates[]") for u in ups]
    if any(a >= b for a, b in zip(ups, ups[1:])):
        raise SpecError("fl_include.updates: strictly ascending")
    _check_canonical(raw, tag, body, order)
    return Inclusion(_bin32(body["job_id"], "job_id"), body["round"], tuple(ups),
                     _bin32(body["aggregate_hash"], "aggregate_hash"))


def confirm_statement(job_id: bytes, round_: int, inc_hash: bytes, agg_hash: bytes) -> list:
    return [bytes(job_id), int(round_), bytes(inc_hash), bytes(agg_hash)]


def encode_confirm(job_id: bytes, round_: int, inc_hash: bytes, agg_hash: bytes, voter: str,
                   signature: bytes) -> bytes:
    return pack(["fl_confirm", {"job_id": job_id, "round": round_, "inclusion_hash": inc_hash,
                                "aggregate_hash": agg_hash,
                                "signed": {"voter": voter, "signature": signature}}])


def decode_confirm(raw: bytes) -> Confirm:
    """Strictly decode an ``fl_confirm`` value (§17.2). Raises SpecError."""
    tag, body = _decode_value(raw)
    if tag != "fl_confirm":
        raise SpecError("not fl_confirm")
    order = ("job_id", "round", "inclusion_hash", "aggregate_hash", "signed")
    if set(body) != set(order):
        raise SpecError("fl_confirm: fields")
    signed = body["signed"]
    if not isinstance(signed, dict) or list(signed) != ["voter", "signature"]:
        raise SpecError("fl_confirm.signed")
    peer_public_key(signed["voter"])
    sig = signed["signature"]
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise SpecError("fl_confirm.signed.signature")
    if not _is_int(body["round"]) or not 1 <= body["round"] <= MAX_ROUNDS:
        raise SpecError("fl_confirm.round: 1 .. 10**6")
    _check_canonical(raw, tag, body, order)
    return Confirm(_bin32(body["job_id"], "job_id"), body["round"],
                   _bin32(body["inclusion_hash"], "inclusion_hash"),
                   _bin32(body["aggregate_hash"], "aggregate_hash"), signed["voter"], sig)


# ---------------------------------------------------------------- §17.7 reductions

def seq(values: Iterable[float]) -> float:
    """Left-to-right float64 sum starting at 0.0 (``seq``)."""
    s = 0.0
    for v in values:
        s = float(np.float64(s) + np.float64(v))
    return s


def tree(v: np.ndarray) -> np.ndarray:
    """Pairwise sum over the LAST axis as §17.7 ``tree`` (vectorised over the
    leading axes). Returns an array of the leading shape."""
    v = np.asarray(v, dtype=np.float64)
    k = v.shape[-1]
    if k == 0:
        return np.zeros(v.shape[:-1])
    if k == 1:
        return v[..., 0].copy()
    w = 1
    while w < k:
        w *= 2
    half = w // 2
    y = v[..., :half].copy()
    y[..., : k - half] = y[..., : k - half] + v[..., half:k]
    while y.shape[-1] > 1:
        h = y.shape[-1] // 2
        y = y[..., :h] + y[..., h:]
    return y[..., 0]


def wsum(rows: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``acc = 0; acc = acc + w_i * x_i`` for each row with w_i != 0."""
    acc = np.zeros(rows.shape[1], dtype=np.float64)
    for i, w in enumerate(weights):
        if w != 0:
            acc = acc + np.float64(w) * rows[i]
    return acc


def norm(v: np.ndarray) -> float:
    return float(np.sqrt(tree(v * v)))


def dot(u: np.ndarray, v: np.ndarray) -> float:
    return float(tree(u * v))


def median_values(values: Sequence[float]) -> float:
    s = sorted(float(x) for x in values)
    n = len(s)
    if n % 2:
        return s[n // 2]
    return float((np.float64(s[n // 2 - 1]) + np.float64(s[n // 2])) / np.float64(2.0))


def median_columns(X: np.ndarray) -> np.ndarray:
    """Per coordinate ``median`` of the rows of X."""
    s = np.sort(X, axis=0, kind="stable")
    n = s.shape[0]
    if n % 2:
        return s[n // 2].copy()
    return (s[n // 2 - 1] + s[n // 2]) / 2.0


def wmed(values: np.ndarray, weights: Sequence[float]) -> float:
    """Lower weighted median (§17.7 ``wmed``) of a 1-d array."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    w = [float(weights[i]) for i in order]
    c, prefix = 0.0, []
    for x in w:
        c = float(np.float64(c) + np.float64(x))
        prefix.append(c)
    last = prefix[-1]
    for k, ck in enumerate(prefix):
        if 2.0 * ck >= last:
            return float(values[order[k]])
    return float(values[order[-1]])


def wmed_columns(X: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Per coordinate ``wmed`` of the rows of X (vectorised)."""
    n, d = X.shape
    order = np.argsort(X, axis=0, kind="stable")
    w = np.asarray(weights, dtype=np.float64)[order]          # n x d
    prefix = np.zeros((n, d))
    c = np.zeros(d)
    for k in range(n):
        c = c + w[k]
        prefix[k] = c
    ok = 2.0 * prefix >= prefix[-1]
    first = np.argmax(ok, axis=0)
    return X[order[first, np.arange(d)], np.arange(d)]


# ---------------------------------------------------------------- §17.7 rules

def flatten(tensors: Tensors, names: Sequence[str] | None = None) -> np.ndarray:
    names = sorted(tensors) if names is None else names
    parts = [np.asarray(tensors[n]).astype(np.float64, copy=False).ravel(order="C") for n in names]
    return np.concatenate(parts) if parts else np.zeros(0)


def validate_update(base: Tensors, update: Tensors, max_update_norm: float) -> np.ndarray:
    """§17.4 step 2 / §17.7 inputs: the update's delta, or UpdateRejected
    (tensors not the base's spec, a NaN/inf, or norm > max_update_norm)."""
    names = sorted(base)
    if sorted(update) != names:
        raise UpdateRejected("tensor names differ from the spec")
    for n in names:
        a, b = np.asarray(update[n]), np.asarray(base[n])
        if a.shape != b.shape or dtype_name(a) != dtype_name(b):
            raise UpdateRejected(f"tensor {n}: shape or dtype differs from the spec")
    p = flatten(update, names)
    x = p - flatten(base, names)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(x))):
        raise UpdateRejected("non-finite value")
    if not norm(x) <= max_update_norm:
        raise UpdateRejected("update norm over max_update_norm")
    return x


@dataclass
class Row:
    """One included update, already one per sender with round-table weight,
    in ascending update-hash order."""
    tensors: Tensors
    num_samples: int
    weight: int
    loss_before: float = 0.0
    loss_after: float = 0.0


@dataclass
class Result:
    tensors: dict
    digest: bytes
    error: str | None = None
    used: list = field(default_factory=list)      # rows the rule used (indices into the input)
    credited: list = field(default_factory=list)  # rows credited update_good
    flagged: list = field(default_factory=list)   # rows flagged by screen / filtered by the rule
    screen_skipped: bool = False


def sq_distances(X: np.ndarray) -> np.ndarray:
    """``D_ij = tree((x_j - x_i) ⊙ (x_j - x_i))`` for i < j, mirrored; zero diagonal."""
    n = X.shape[0]
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            diff = X[j] - X[i]
            D[i, j] = D[j, i] = float(tree(diff * diff))
    return D


def krum_scores(X: np.ndarray, f: int) -> list[float]:
    """``score_i`` = seq of the n - f - 2 smallest D_ij (j != i), ascending."""
    n = X.shape[0]
    D = sq_distances(X)
    keep = n - f - 2
    return [seq(sorted(D[i, j] for j in range(n) if j != i)[:keep]) for i in range(n)]


def rule_delta(rule: str, f: int, X: np.ndarray, n_s: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, list, list]:
    """The δ of §17.7's table. Returns (delta, credited rows, filtered rows)
    (rows index X). Raises SpecError when the rule cannot run."""
    n = X.shape[0]
    if n < rule_minimum(rule, f):
        raise SpecError(f"{rule}: {n} updates < minimum {rule_minimum(rule, f)}")
    if rule == "fedavg":
        a = [float(np.float64(n_s[i]) * np.float64(r[i])) for i in range(n)]
        total = seq(a)
        if not (math.isfinite(total) and total > 0):
            raise SpecError("fedavg: total weight not finite and > 0")
        return wsum(X, a) / total, list(range(n)), []
    if rule == "median":
        return median_columns(X), [], []
    if rule == "trimmed_mean":
        s = np.sort(X, axis=0, kind="stable")[f: n - f]
        return wsum(s, [1.0] * s.shape[0]) / float(n - 2 * f), [], []
    if rule in ("krum", "multi_krum"):
        scores = krum_scores(X, f)
        order = sorted(range(n), key=lambda i: (scores[i], i))
        if rule == "krum":
            return X[order[0]].copy(), [order[0]], []
        m = n - f
        chosen = sorted(order[:m])
        return wsum(X[chosen], [1.0] * m) / float(m), chosen, []
    if rule == "reputation_clipped":
        c = wmed_columns(X, r)
        d = np.array([norm(X[i] - c) for i in range(n)])
        tau = wmed(d, r)
        kept = [i for i in range(n) if not d[i] > 4.0 * tau]
        filtered = [i for i in range(n) if d[i] > 4.0 * tau]
        cap = median_values(n_s)
        a = {i: float(np.float64(r[i]) * np.float64(min(float(n_s[i]), cap))) for i in kept}
        acc = np.zeros(X.shape[1])
        for i in kept:
            s = 1.0 if (d[i] <= tau or d[i] == 0) else float(np.float64(tau) / np.float64(d[i]))
            acc = acc + a[i] * (c + (X[i] - c) * s)
        total = seq(a[i] for i in kept)
        if not (math.isfinite(total) and total > 0):
            raise SpecError("reputation_clipped: total weight not finite and > 0")
        return acc / total, kept, filtered
    raise SpecError(f"unknown rule {rule!r}")


def screen_scores(X: np.ndarray, loss_delta: Sequence[float]) -> np.ndarray:
    """§17.7 anomaly screen: the n x 3 features (norm, cosine distance to the
    coordinate-wise median, loss_after - loss_before)."""
    n = X.shape[0]
    m = median_columns(X)
    nm = norm(m)
    feats = np.zeros((n, 3))
    for i in range(n):
        ni = norm(X[i])
        if ni == 0 and nm == 0:
            cos = 0.0
        elif ni == 0 or nm == 0:
            cos = 1.0
        else:
            cos = 1.0 - dot(X[i], m) / (ni * nm)
        feats[i] = (ni, cos, float(loss_delta[i]))
    return feats


def robust_z(feats: np.ndarray) -> np.ndarray:
    """§17.7 one-sided modified z-score, the largest over the features."""
    n, k = feats.shape
    z = np.zeros(n)
    for j in range(k):
        col = feats[:, j]
        med = median_values(col)
        dev = col - med
        mad = max(median_values(np.abs(dev)), 0.1 * abs(med))
        if mad > 0:
            zj = (0.6745 * dev) / mad
        else:
            mean_ad = float(wsum(np.abs(dev)[:, None], [1.0] * n)[0]) / n
            zj = (0.7979 * dev) / mean_ad if mean_ad > 0 else np.zeros(n)
        z = np.maximum(z, np.maximum(zj, 0.0))
    return z


def screen(X: np.ndarray, loss_delta: Sequence[float],
           isolation_outliers: Callable[[np.ndarray], np.ndarray]) -> list[int]:
    """§17.7 anomaly screen: the flagged rows. `isolation_outliers(features)`
    returns a boolean mask of the IsolationForest's outliers (specified only
    by scikit-learn, so supplied by the caller)."""
    n = X.shape[0]
    if n < 4:
        return []
    feats = screen_scores(X, loss_delta)
    z = robust_z(feats)
    outl = np.asarray(isolation_outliers(feats), dtype=bool)
    cands = [i for i in range(n) if outl[i] and z[i] > 3.5]
    cands.sort(key=lambda i: (-z[i], i))
    return sorted(cands[: (n - 1) // 2])


def aggregate(base: Tensors, rows: Sequence[Row], rule: str, f: int, *,
              detect_anomalies: bool = False,
              isolation_outliers: Callable[[np.ndarray], np.ndarray] | None = None) -> Result:
    """§17.4 step 4 / §17.7: the new model from `rows` (validated, ascending
    update-hash order, one per weighted sender). On a rule failure the result
    is the base model with ``error`` set."""
    names = sorted(base)
    b = flatten(base, names)
    if not np.all(np.isfinite(b)):
        raise SpecError("base model with a non-finite value")
    X = np.zeros((len(rows), b.size))
    for i, r in enumerate(rows):
        p = flatten(r.tensors, names)
        with np.errstate(over="ignore", invalid="ignore"):
            X[i] = p - b
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(X[i]))):
            raise UpdateRejected(f"row {i}: a NaN or inf in the update or its delta")
    n_s = np.array([float(r.num_samples) for r in rows])
    w = np.array([float(r.weight) for r in rows])
    idx = list(range(len(rows)))
    flagged: list[int] = []
    skipped = False
    if detect_anomalies:
        if isolation_outliers is None:
            raise SpecError("detect_anomalies needs the IsolationForest step")
        flagged = screen(X, [r.loss_after - r.loss_before for r in rows], isolation_outliers)
        if flagged:
            rest = [i for i in idx if i not in flagged]
            if len(rest) >= rule_minimum(rule, f):
                idx = rest
            else:
                skipped = True
    base_copy = {n: np.asarray(base[n]).copy() for n in names}
    filtered: list[int] = []
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            delta, credited, filtered = rule_delta(rule, f, X[idx], n_s[idx], w[idx])
            if not np.all(np.isfinite(delta)):
                raise SpecError("non-finite delta")
            new = b + delta
            out, off = {}, 0
            for n in names:
                a = np.asarray(base[n])
                size = a.size
                out[n] = new[off: off + size].reshape(a.shape).astype(DTYPES[dtype_name(a)])
                off += size
                if not np.all(np.isfinite(out[n])):
                    raise SpecError("non-finite result")
    except SpecError as exc:
        # rows the rule itself filtered (reputation_clipped) stay flagged when only its
        # result failed (not finite): they were judged before the failure
        return Result(base_copy, model_hash(base_copy), error=str(exc),
                      flagged=sorted(set(flagged) | {idx[i] for i in filtered}), screen_skipped=skipped)
    credited = [idx[i] for i in credited if idx[i] not in flagged]
    return Result(out, model_hash(out), used=idx, credited=credited,
                  flagged=sorted(set(flagged) | {idx[i] for i in filtered}), screen_skipped=skipped)


# ---------------------------------------------------------------- §17.4 over the log

@dataclass
class RoundVerdict:
    round: int
    start: tuple[int, int]          # (height, index in block) of the point that started it
    epoch: int
    base_hash: bytes
    inclusion: Inclusion | None = None
    inclusion_at: tuple[int, int] | None = None
    certified_hash: bytes | None = None
    certified_at: tuple[int, int] | None = None
    fast_path: bool = False
    voters: list = field(default_factory=list)


def fast_path_epoch(table: Mapping[str, int], participants: Sequence[str]) -> bool:
    """§17.4 step 5: validators outside the job hold at most 1/3 of the weight."""
    total = sum(table.values())
    outside = sum(w for p, w in table.items() if p not in set(participants))
    return 3 * outside <= total


def follow_job(job_value: bytes, blocks: Sequence[tuple[int, int, Sequence[bytes]]],
               tables: Mapping[int, Mapping[str, int]], network_id: bytes,
               verify: Callable[[bytes, bytes, bytes], bool]) -> list[RoundVerdict]:
    """§17.4 steps 1, 3 and 5 over the committed log.

    `blocks`: committed blocks in height order, each (height, epoch, values in
    block order). `tables`: epoch -> weight table (§15.4). Returns one verdict
    per round begun, in round order (the last one may be uncertified).
    """
    job = decode_job(job_value)
    jid = job.job_id
    parts = list(job.participants)
    zero = model_hash(zero_model(model_spec(job.model_kind, job.n_features, job.classes)))
    rounds: list[RoundVerdict] = []
    cur: RoundVerdict | None = None
    confirms: dict[int, list[tuple[tuple[int, int], Confirm]]] = {}
    for height, epoch, values in blocks:
        for index, raw in enumerate(values):
            point = (height, index)
            if cur is None:
                if bytes(raw) == bytes(job_value) and not rounds:
                    cur = RoundVerdict(1, point, epoch, zero)
                    rounds.append(cur)
                continue
            if cur.certified_hash is not None:
                break  # finished
            try:
                tag, _ = _decode_value(raw)
            except SpecError:
                continue
            certified_now = False
            if tag == "fl_include":
                try:
                    inc = decode_inclusion(raw)
                except SpecError:
                    continue
                if (inc.job_id == jid and inc.round == cur.round and cur.inclusion is None
                        and job.quorum <= len(inc.updates) <= len(parts)):
                    cur.inclusion, cur.inclusion_at = inc, point
                    if fast_path_epoch(tables[epoch], parts):
                        cur.certified_hash, cur.certified_at, cur.fast_path = inc.aggregate_hash, point, True
                        certified_now = True
                    else:
                        certified_now = _count_confirms(cur, confirms.get(cur.round, []), point, tables,
                                                        parts, network_id, verify, jid)
            elif tag == "fl_confirm":
                try:
                    conf = decode_confirm(raw)
                except SpecError:
                    continue
                if conf.job_id != jid or conf.round < cur.round:
                    continue
                held = confirms.setdefault(conf.round, [])
                waiting = conf.round > cur.round or cur.inclusion is None
                if waiting and (conf.voter not in parts
                                or sum(c.voter == conf.voter for _, c in held) >= MAX_HELD_CONFIRMS_PER_VOTER):
                    continue  # §17.4 step 5: at most 4 held per participant, none of others
                held.append((point, conf))
                if conf.round == cur.round and cur.inclusion is not None:
                    certified_now = _count_confirms(cur, confirms[cur.round], point, tables, parts,
                                                    network_id, verify, jid)
            if certified_now and cur.round < job.rounds:
                cur = RoundVerdict(cur.round + 1, point, epoch, cur.certified_hash)
                rounds.append(cur)
    return rounds


def _count_confirms(cur: RoundVerdict, held: list, point: tuple[int, int], tables, parts,
                    network_id: bytes, verify, jid: bytes) -> bool:
    table = {p: w for p, w in tables[cur.epoch].items() if p in set(parts)}
    total = sum(table.values())
    ihash = inclusion_hash(cur.inclusion.updates)
    seen: set[str] = set()
    votes: dict[bytes, int] = {}
    cur.voters = []
    for _pt, c in held:
        if c.inclusion_hash != ihash or c.voter in seen or c.voter not in table:
            continue
        msg = vote_bytes("fl_confirm", network_id, cur.epoch,
                         confirm_statement(jid, c.round, c.inclusion_hash, c.aggregate_hash))
        if not verify(peer_public_key(c.voter), msg, c.signature):
            continue
        seen.add(c.voter)
        cur.voters.append(c.voter)
        votes[c.aggregate_hash] = votes.get(c.aggregate_hash, 0) + table[c.voter]
        if 3 * votes[c.aggregate_hash] > 2 * total:
            cur.certified_hash, cur.certified_at = c.aggregate_hash, point
            return True
    return False

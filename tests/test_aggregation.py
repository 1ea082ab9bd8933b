"""Aggregation maths: hand-computed cases, robustness properties (hypothesis), determinism,
update validation, anomaly detection, models and dataset splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chimera.consensus.aggregation import (
    RULES,
    AggregationConfig,
    AggregationError,
    ModelSpec,
    TensorSpec,
    Update,
    UpdateRejected,
    aggregate,
    aggregate_hash,
    combine,
    coordinate_median,
    detect_anomalies,
    fedavg,
    krum_scores,
    krum_select,
    reputation_clipped_mean,
    pairwise_sq_distances,
    robust_z,
    row_dots,
    sequential_sum,
    tree_sum,
    trimmed_mean,
    update_features,
    validate_update,
    weighted_coordinate_median,
)
from chimera.consensus.datasets import (
    Shard,
    load_digits_data,
    split_dirichlet,
    split_iid,
    train_test_split_fixed,
)
from chimera.consensus.models import make_adapter
from chimera.protocol.errors import LocalProtocolError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = ModelSpec((TensorSpec("w", (2, 3), "float64"), TensorSpec("b", (2,), "float32")))


def upd(sender, w, b, n=1, weight=1.0, **kw) -> Update:
    return Update(sender=sender, params={"w": np.asarray(w, dtype=np.float64), "b": np.asarray(b, dtype=np.float32)},
                  num_samples=n, weight=weight, **kw)


# ------------------------------------------------------------- hand computed


def test_fedavg_hand_computed_with_samples_and_reputation():
    X = np.array([[1.0, 0.0], [3.0, 4.0]])
    # weights 1*2 and 3*1 -> (2*[1,0] + 3*[3,4]) / 5
    assert fedavg(X, np.array([1, 3]), np.array([2.0, 1.0])).tolist() == [11 / 5, 12 / 5]
    with pytest.raises(AggregationError):
        fedavg(X[:0], np.array([]), np.array([]))


def test_median_trimmed_mean_and_krum_hand_computed():
    X = np.array([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [4.0, 2.0]])
    assert coordinate_median(X).tolist() == [3.0, 1.0]
    assert coordinate_median(X[:4]).tolist() == [2.5, 0.5]
    assert trimmed_mean(X, 1).tolist() == [3.0, 1.0]  # (2+3+4)/3, (0+1+2)/3
    with pytest.raises(AggregationError):
        trimmed_mean(X[:2], 1)
    with pytest.raises(AggregationError):
        coordinate_median(X[:2], 1)
    # Krum, n=5, f=1: score = sum of the n-f-2 = 2 smallest squared distances
    P = np.array([[0.0], [1.0], [2.0], [3.0], [50.0]])
    assert krum_scores(P, 1).tolist() == [1 + 4, 1 + 1, 1 + 1, 1 + 4, 47**2 + 48**2]
    assert krum_select(P, 1) == [1]
    assert krum_select(P, 1, m=3) == [0, 1, 2]
    with pytest.raises(AggregationError, match=r"n > 2f \+ 2"):
        krum_scores(P[:4], 1)


def test_weighted_median_and_reputation_clipped_hand_computed():
    X = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert weighted_coordinate_median(X, np.array([1, 1, 1, 1])).tolist() == [1.0]
    assert weighted_coordinate_median(X, np.array([1, 1, 1, 5])).tolist() == [10.0]
    # center 1, distances [1, 0, 1, 9], tau = 1 (lower weighted median), 9 > 4 tau is filtered;
    # the others are within tau: mean of 0, 1, 2 = 1
    assert reputation_clipped_mean(X, np.ones(4), np.ones(4)).tolist() == [1.0]
    # clipping: with cutoff 10 the far row is kept but clipped to 1 + 1 = 2 -> (0 + 1 + 2 + 2) / 4
    assert reputation_clipped_mean(X, np.ones(4), np.ones(4), cutoff=10.0).tolist() == [1.25]


def test_aggregate_works_on_deltas_and_casts_to_declared_dtypes():
    base = {"w": np.ones((2, 3)), "b": np.ones(2, dtype=np.float32)}
    a = upd("a", np.full((2, 3), 2.0), [2, 2], n=1)
    b = upd("b", np.full((2, 3), 4.0), [4, 4], n=3)
    res = aggregate([a, b], SPEC, AggregationConfig(), base=base)
    assert res.params["w"].dtype == np.float64 and res.params["b"].dtype == np.float32
    assert np.array_equal(res.params["w"], np.full((2, 3), 3.5))
    assert res.digest == aggregate_hash(res.params, SPEC)
    assert set(res.senders_used) == {"a", "b"} and res.error is None
    # a rule whose precondition fails keeps the base model, the same way on every peer
    krum = aggregate([a, b], SPEC, AggregationConfig(rule="krum", f=1), base=base)
    assert krum.error and krum.digest == aggregate_hash(base, SPEC) and krum.used == ()
    with pytest.raises(AggregationError):
        aggregate([a, a], SPEC, AggregationConfig())


# --------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def matrices(draw, min_rows=1, max_rows=9, max_cols=6):
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, max_cols))
    return np.array(draw(st.lists(st.lists(finite, min_size=d, max_size=d), min_size=n, max_size=n)))


@SETTINGS
@given(row=st.lists(finite, min_size=1, max_size=8), n=st.integers(1, 8),
       samples=st.lists(st.integers(1, 1000), min_size=8, max_size=8))
def test_mean_of_identical_updates_is_the_update(row, n, samples):
    X = np.tile(np.array(row), (n, 1))
    s = np.array(samples[:n])
    for result in (fedavg(X, s, np.ones(n)), coordinate_median(X), trimmed_mean(X, (n - 1) // 2),
                   reputation_clipped_mean(X, s, np.ones(n))):
        assert np.allclose(result, row, rtol=1e-12, atol=1e-9)
    if n >= 3:
        assert np.allclose(X[krum_select(X, 0)[0]], row)


@SETTINGS
@given(honest=matrices(min_rows=3, max_rows=7), data=st.data())
def test_median_and_trimmed_mean_ignore_up_to_f_arbitrary_updates(honest, data):
    n_honest, d = honest.shape
    f = data.draw(st.integers(0, (n_honest - 1) // 2))  # n = n_honest + f > 2f
    bad = np.array(data.draw(st.lists(st.lists(st.floats(-1e12, 1e12), min_size=d, max_size=d),
                                      min_size=f, max_size=f))).reshape(f, d)
    X = np.vstack([honest, bad])
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    for result in (coordinate_median(X, f), trimmed_mean(X, f)):
        assert np.all(result >= lo - 1e-9) and np.all(result <= hi + 1e-9)


@SETTINGS
@given(n_honest=st.integers(4, 8), d=st.integers(1, 5), seed=st.integers(0, 2**16), data=st.data())
def test_krum_selects_an_honest_update_when_n_above_2f_plus_2(n_honest, d, seed, data):
    rng = np.random.default_rng(seed)
    f = data.draw(st.integers(1, (n_honest - 1) // 2))  # n = n_honest + f > 2f + 2
    honest = rng.normal(0.0, 1.0, size=(n_honest, d))
    scale = data.draw(st.floats(50.0, 1e6))
    direction = rng.normal(size=(f, d))
    bad = scale * direction / np.linalg.norm(direction, axis=1, keepdims=True) + rng.normal(0, 1e-3, (f, d))
    X = np.vstack([honest, bad])
    for index in krum_select(X, f, m=n_honest + f - f):
        assert index < n_honest


@SETTINGS
@given(X=matrices(min_rows=1, max_rows=8))
def test_reputation_clipped_stays_in_the_hull_of_honest_majority_weight(X):
    n = X.shape[0]
    out = reputation_clipped_mean(X, np.ones(n), np.ones(n))
    assert np.all(np.isfinite(out))
    assert np.all(out >= X.min(axis=0) - 1e-6) and np.all(out <= X.max(axis=0) + 1e-6)


# ------------------------------------------------------------- determinism


def _random_updates(seed: int, n: int, d: int = 64 * 10):
    rng = np.random.default_rng(seed)
    spec = ModelSpec((TensorSpec("coef", (10, 64), "float64"), TensorSpec("intercept", (10,), "float64")))
    ups = [Update(sender=f"peer-{i}", params={"coef": rng.normal(size=(10, 64)), "intercept": rng.normal(size=10)},
                  num_samples=int(rng.integers(1, 500)), weight=float(rng.integers(1, 100)),
                  loss_before=1.0, loss_after=float(rng.uniform(0.1, 1.0)))
           for i in range(n)]
    return spec, ups


@pytest.mark.parametrize("rule", RULES)
def test_two_peers_compute_bitwise_identical_aggregates(rule):
    spec, ups = _random_updates(11, 9)
    config = AggregationConfig(rule=rule, f=2, detect=True)
    base = {k: np.asarray(v) * 0.5 for k, v in ups[0].params.items()}
    first = aggregate(ups, spec, config, base=base)
    # the second peer received the same updates in another order, as fresh copies
    rng = np.random.default_rng(5)
    copies = [Update(sender=u.sender, params={k: v.copy() for k, v in u.params.items()}, num_samples=u.num_samples,
                     weight=u.weight, loss_before=u.loss_before, loss_after=u.loss_after)
              for u in (ups[i] for i in rng.permutation(len(ups)))]
    second = aggregate(copies, spec, config, base={k: v.copy() for k, v in base.items()})
    assert first.digest == second.digest
    for name in first.params:
        assert first.params[name].tobytes() == second.params[name].tobytes()
    assert first.used == second.used and first.flagged == second.flagged


# --------------------------------------------------------------- validation


def test_validate_update_rejects_bad_updates_with_clear_reasons():
    good = {"w": np.zeros((2, 3)), "b": np.zeros(2, dtype=np.float32)}
    assert validate_update(good, SPEC) == 0.0
    cases = {
        "differ": {"w": np.zeros((2, 3))},
        "shape": {"w": np.zeros((3, 2)), "b": np.zeros(2, dtype=np.float32)},
        "dtype": {"w": np.zeros((2, 3)), "b": np.zeros(2, dtype=np.float64)},
        "non-finite": {"w": np.array([[np.inf, 0, 0], [0, 0, 0]]), "b": np.zeros(2, dtype=np.float32)},
        "above the bound": {"w": np.full((2, 3), 10.0), "b": np.zeros(2, dtype=np.float32)},
        "not an array": {"w": [[0.0] * 3] * 2, "b": np.zeros(2, dtype=np.float32)},
    }
    for text, params in cases.items():
        with pytest.raises(UpdateRejected) as info:
            validate_update(params, SPEC, max_norm=1.0)
        assert info.value.reason == "bad_update" and text in str(info.value), (text, info.value)
    huge = {"w": np.full((2, 3), 1e200), "b": np.zeros(2, dtype=np.float32)}  # finite, its norm is not
    with pytest.raises(UpdateRejected, match="overflows float64"):
        validate_update(huge, SPEC, max_norm=math.inf)
    base = {"w": np.full((2, 3), 10.0), "b": np.zeros(2, dtype=np.float32)}
    assert validate_update(cases["above the bound"], SPEC, base=base, max_norm=1.0) == 0.0  # delta norm
    with pytest.raises(LocalProtocolError):
        TensorSpec("x", (2,), "int64")
    with pytest.raises(LocalProtocolError):
        Update(sender="a", params=good, num_samples=0)
    with pytest.raises(LocalProtocolError):
        Update(sender="a", params=good, num_samples=10**400)  # float() of it overflowed in FedAvg
    with pytest.raises(LocalProtocolError):
        AggregationConfig(rule="mean")


# ------------------------------------------------------------ anomaly detection


def test_anomaly_detection_flags_sign_flipped_scaled_update_only():
    rng = np.random.default_rng(3)
    trend = rng.normal(size=200)
    honest = np.array([trend + rng.normal(0, 0.5, 200) for _ in range(6)])
    attack = -10.0 * honest[0]
    X = np.vstack([honest, attack])
    digests = [bytes([i]) * 32 for i in range(7)]
    report = detect_anomalies(X, digests, np.zeros(7))
    assert report.flagged == frozenset({digests[6]})
    assert report.features.shape == (7, 3) and report.z[6] > 3.5
    # fewer than 4 updates: nothing is flagged; identical updates: nothing is flagged
    assert detect_anomalies(X[:3], digests[:3], np.zeros(3)).flagged == frozenset()
    same = np.tile(honest[0], (5, 1))
    assert detect_anomalies(same, digests[:5], np.zeros(5)).flagged == frozenset()


def test_robust_z_is_one_sided_and_handles_zero_mad():
    z = robust_z(np.array([[1.0], [1.0], [1.0], [1.0], [5.0]]))
    assert z[:4].tolist() == [[0.0]] * 4 and z[4, 0] > 3.5
    assert robust_z(np.array([[0.0], [0.0]])).tolist() == [[0.0], [0.0]]
    assert robust_z(np.array([[10.0], [1.0], [1.0], [1.0], [1.0]]))[0, 0] > 3.5
    assert robust_z(np.array([[-10.0], [1.0], [1.0], [1.0], [1.0]]))[0, 0] == 0.0


def test_aggregate_with_detection_excludes_and_reports_the_outlier():
    spec, ups = _random_updates(2, 6)
    base = {k: np.zeros_like(v) for k, v in ups[0].params.items()}
    trend = ups[0].params
    honest = [Update(sender=f"h{i}", params={k: v + 0.1 * np.random.default_rng(i).normal(size=v.shape)
                                             for k, v in trend.items()}, num_samples=10) for i in range(5)]
    attacker = Update(sender="bad", params={k: -10.0 * v for k, v in trend.items()}, num_samples=10)
    res = aggregate(honest + [attacker], spec, AggregationConfig(rule="fedavg", detect=True), base=base)
    assert res.senders_flagged == ("bad",) and "bad" not in res.senders_used
    assert set(res.senders_credited) == {f"h{i}" for i in range(5)}
    # Krum / Multi-Krum credit only what they chose; the coordinate-wise rules credit nobody
    # (an attacker whose update they outvote must not earn update_good)
    krum = aggregate(honest + [attacker], spec, AggregationConfig(rule="krum", f=1), base=base)
    assert len(krum.senders_credited) == 1 and "bad" not in krum.senders_credited
    multi = aggregate(honest + [attacker], spec, AggregationConfig(rule="multi_krum", f=1), base=base)
    assert "bad" not in multi.senders_credited and len(multi.senders_credited) == 5
    for rule in ("median", "trimmed_mean"):
        res = aggregate(honest + [attacker], spec, AggregationConfig(rule=rule, f=1), base=base)
        assert res.senders_credited == () and "bad" in res.senders_used


# ------------------------------------------- screen at the rule's minimum, Multi-Krum, finiteness


def _cluster_and_attacker(n_honest: int, samples: int = 10, attacker_samples: int = 10):
    """Honest updates near 1.0, one attacker at -10 (the anomaly screen flags it)."""
    spec = ModelSpec((TensorSpec("w", (20,), "float64"),))
    rng = np.random.default_rng(1)
    honest = [Update(sender=f"h{i}", params={"w": rng.normal(1.0, 0.1, 20)}, num_samples=samples)
              for i in range(n_honest)]
    attacker = Update(sender="byz", params={"w": np.full(20, -10.0)}, num_samples=attacker_samples)
    return spec, honest + [attacker]


@pytest.mark.parametrize("rule,f,n_honest", [("krum", 1, 4), ("multi_krum", 1, 4), ("trimmed_mean", 2, 4),
                                             ("median", 2, 4)])
def test_screen_at_the_rules_minimum_runs_the_rule_on_every_update(rule, f, n_honest):
    # n = min_updates(): excluding the flagged attacker would leave too few for f. The round used
    # to fail (base model kept: the attacker won); now the rule runs on all n with the same f.
    spec, ups = _cluster_and_attacker(n_honest)
    config = AggregationConfig(rule=rule, f=f, detect=True)
    assert len(ups) == config.min_updates()
    res = aggregate(ups, spec, config)
    plain = aggregate(ups, spec, AggregationConfig(rule=rule, f=f))
    assert res.error is None and res.screen_skipped
    assert res.digest == plain.digest  # same f, same rows: f is not lowered by the number flagged
    assert res.senders_flagged == ("byz",) and "byz" in res.senders_used
    assert "byz" not in res.senders_credited
    assert abs(float(res.params["w"].mean()) - 1.0) < 0.2
    # one more honest update: the screen's exclusion applies as before
    spec, ups = _cluster_and_attacker(n_honest + 1)
    res = aggregate(ups, spec, config)
    assert res.error is None and not res.screen_skipped
    assert res.senders_flagged == ("byz",) and "byz" not in res.senders_used
    # nothing flagged, or detection off: never skipped
    assert not aggregate(ups[:-1], spec, config).screen_skipped
    assert not aggregate(ups, spec, AggregationConfig(rule=rule, f=f)).screen_skipped


def test_multi_krum_is_the_plain_mean_of_the_selected_updates():
    # Blanchard et al. 2017 §5: the average of the m best-scored vectors, whatever the
    # self-reported sample counts (they were weights: 2**40 samples made one update the result)
    P = np.array([[0.0], [1.0], [2.0], [3.0], [50.0]])
    config = AggregationConfig(rule="multi_krum", f=1, multi_krum_m=3)
    for samples in ([1, 1, 1, 1, 1], [1, 1, 2**40, 1, 1], [1000, 1, 1, 1, 1]):
        for reputation in ([1, 1, 1, 1, 1], [1, 50, 1, 1, 1]):
            out = combine(P, np.array(samples, dtype=np.float64), np.array(reputation, dtype=np.float64), config)
            assert out.tolist() == [1.0]  # (0 + 1 + 2) / 3
    # the auditor's case: two colluding byzantine updates near the cluster, one selected
    rng = np.random.default_rng(0)
    H = rng.normal(0, 1, (5, 50))
    b = H.mean(0) + 1.2 * np.ones(50) / np.sqrt(50) * np.linalg.norm(H[0] - H[1])
    X = np.vstack([H, b, b])
    assert 5 in krum_select(X, 2, 5)
    honest_claims = combine(X, np.array([10.0] * 7), np.ones(7), AggregationConfig(rule="multi_krum", f=2))
    inflated = combine(X, np.array([10.0] * 5 + [2.0**40] * 2), np.ones(7), AggregationConfig(rule="multi_krum", f=2))
    assert honest_claims.tobytes() == inflated.tobytes()
    assert np.linalg.norm(inflated - b) > 1.0


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "reputation_clipped"])
def test_robust_rules_do_not_trust_inflated_sample_counts(rule):
    # Only FedAvg weights by the reported count (documented: not robust); reputation_clipped caps
    # counts at their median, the others ignore them.
    spec, honest = _random_updates(4, 6)
    base = spec.zeros()
    config = AggregationConfig(rule=rule, f=1)

    def with_samples(count):  # fixed digests: the row order must not change with the count
        ups = [Update(sender=u.sender, params=u.params, num_samples=100, weight=1.0, digest=bytes([i]) * 32)
               for i, u in enumerate(honest[:5])]
        return ups + [Update(sender="liar", params=honest[5].params, num_samples=count, weight=1.0,
                             digest=bytes([9]) * 32)]

    assert aggregate(with_samples(100), spec, config, base).digest == aggregate(with_samples(2**40), spec, config,
                                                                                    base).digest
    fed = AggregationConfig(rule="fedavg")
    liar = aggregate(with_samples(2**40), spec, fed, base).params["coef"]
    assert np.allclose(liar, honest[5].params["coef"], atol=1e-6)  # FedAvg: the liar is the result


@pytest.mark.parametrize("rule", RULES)
def test_aggregate_rejects_non_finite_updates(rule):
    spec = ModelSpec((TensorSpec("w", (3,), "float64"), TensorSpec("b", (2,), "float32")))

    def u(sender, w, b=(0.0, 0.0)):
        return Update(sender=sender, params={"w": np.array(w, dtype=np.float64), "b": np.array(b, dtype=np.float32)},
                      num_samples=1)

    good = [u(f"g{i}", [1.0 + i, 2.0, 3.0]) for i in range(5)]
    config = AggregationConfig(rule=rule, f=1 if rule != "fedavg" else 0)
    for bad in (u("bad", [np.nan, 2.0, 3.0]), u("bad", [1.0, np.inf, 3.0]), u("bad", [1.0, 2.0, -np.inf]),
                u("bad", [1.0, 2.0, 3.0], [0.0, np.nan])):
        with pytest.raises(UpdateRejected, match="'bad': non-finite") as info:
            aggregate(good + [bad], spec, config)
        assert info.value.reason == "bad_update"
    # finite parameters whose delta to the base overflows float64
    base = {"w": np.full(3, -1.7e308), "b": np.zeros(2, dtype=np.float32)}
    with pytest.raises(UpdateRejected, match="overflows"):
        aggregate(good[:4] + [u("big", [1.7e308, 0.0, 0.0])], spec, config, base=base)
    with pytest.raises(LocalProtocolError, match="base model"):
        aggregate(good, spec, config, base={"w": np.array([np.nan, 0, 0]), "b": np.zeros(2, dtype=np.float32)})
    with pytest.raises(UpdateRejected):
        combine(np.array([[1.0, np.nan]] * 5), np.ones(5), np.ones(5), config)


def test_aggregate_that_overflows_is_an_error_that_keeps_the_base_model():
    spec = ModelSpec((TensorSpec("w", (2,), "float64"),))
    ups = [Update(sender=s, params={"w": np.array([1.7e308, 0.0])}, num_samples=1) for s in "ab"]
    res = aggregate(ups, spec, AggregationConfig(rule="fedavg"))
    assert res.error and "not finite" in res.error and res.params["w"].tolist() == [0.0, 0.0] and res.used == ()
    huge = [Update(sender=s, params={"w": np.array([1.0, 0.0])}, num_samples=2**62, weight=1e300) for s in "ab"]
    res = aggregate(huge, spec, AggregationConfig(rule="fedavg"))
    assert res.error and res.params["w"].tolist() == [0.0, 0.0]


# ------------------------------------------------------- deterministic reductions (no BLAS)


def _reference_tree_sum(values) -> float:
    """The tree of docs/PROTOCOL.md §17.7 in plain Python floats (IEEE-754 double adds)."""
    xs = [float(v) for v in values]
    if not xs:
        return 0.0
    width = 1
    while width < len(xs):
        width *= 2
    if width == 1:
        return xs[0]
    half = width // 2
    level = [xs[j] + xs[j + half] if j + half < len(xs) else xs[j] for j in range(half)]
    while len(level) > 1:
        half = len(level) // 2
        level = [level[j] + level[j + half] for j in range(half)]
    return level[0]


def _bits(x: float) -> bytes:
    return np.float64(x).tobytes()


def test_tree_sum_matches_the_specified_pairwise_tree_bit_for_bit():
    # crafted: 1 + seven times 2**-54; the order decides the last bits
    crafted = [1.0] + [2.0**-54] * 7
    assert _reference_tree_sum(crafted) == 1.0 + 2.0**-52  # (1 + 2e) + 4e with e = 2**-54
    assert sequential_sum(crafted) == 1.0 and math.fsum(crafted) == 1.0 + 2.0**-51  # the three differ
    assert tree_sum(np.array(crafted)) == 1.0 + 2.0**-52
    rng = np.random.default_rng(7)
    for k in (0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 100, 127, 128, 129, 1001, 4097):
        v = rng.normal(size=k) * np.exp(rng.normal(0.0, 8.0, size=k))
        assert _bits(tree_sum(v)) == _bits(_reference_tree_sum(v)), k
        M = rng.normal(size=(3, k))
        assert [_bits(x) for x in row_dots(M)] == [_bits(_reference_tree_sum(r * r)) for r in M]
    assert sequential_sum([0.1, 0.2, 0.3]) == (0.1 + 0.2) + 0.3


def test_norm_bound_and_anomaly_features_use_the_deterministic_reduction():
    # The norm bound and the cosine feature decide acceptance and flagging on every peer: they
    # are pinned to the tree, not np.dot (BLAS: order depends on CPU, build and threads).
    rng = np.random.default_rng(7)
    d = 1001
    spec = ModelSpec((TensorSpec("w", (d,), "float64"),))
    v = rng.normal(size=d) * np.exp(rng.normal(0.0, 3.0, size=d))
    base = rng.normal(size=d)
    delta = (v - base).tolist()
    expected = math.sqrt(_reference_tree_sum(x * x for x in delta))
    assert _bits(validate_update({"w": v}, spec, base={"w": base})) == _bits(expected)
    crafted = np.array([1.0] + [2.0**-27] * 7)  # squares: 1 and seven 2**-54
    assert validate_update({"w": np.pad(crafted, (0, d - 8))}, spec) == math.sqrt(1.0 + 2.0**-52)
    # features: norm and cosine distance to the coordinate-wise median, in plain Python
    X = rng.normal(size=(6, 257)) * np.exp(rng.normal(0.0, 2.0, size=(6, 257)))
    feats = update_features(X, np.zeros(6))
    med = np.median(X, axis=0).tolist()
    med_norm = math.sqrt(_reference_tree_sum(m * m for m in med))
    for i, row in enumerate(X.tolist()):
        norm = math.sqrt(_reference_tree_sum(x * x for x in row))
        cos = 1.0 - _reference_tree_sum(x * m for x, m in zip(row, med)) / (norm * med_norm)
        assert _bits(feats[i, 0]) == _bits(norm) and _bits(feats[i, 1]) == _bits(cos)
    # Krum's squared distances and reputation_clipped's distances use it too
    D = pairwise_sq_distances(X)
    for i in range(6):
        for j in range(i + 1, 6):
            ref = _reference_tree_sum((b - a) * (b - a) for a, b in zip(X[i].tolist(), X[j].tolist()))
            assert _bits(D[i, j]) == _bits(ref) == _bits(D[j, i])


# ------------------------------------------------------------- models, data


def test_models_roundtrip_parameters_and_fit_deterministically():
    X, y = load_digits_data()
    train, test = train_test_split_fixed(X, y, 0.2, seed=0)
    a = make_adapter("sgd_classifier", 64, range(10))
    b = make_adapter("sgd_classifier", 64, range(10))
    fa = a.fit(train.X[:300], train.y[:300], epochs=2, learning_rate=0.1, seed=3)
    b.fit(train.X[:300], train.y[:300], epochs=2, learning_rate=0.1, seed=3)
    assert all(np.array_equal(a.get_params()[k], b.get_params()[k]) for k in ("coef", "intercept"))
    assert fa.num_samples == 300 and fa.loss_after < fa.loss_before
    assert a.spec.names == ("coef", "intercept") and a.get_params()["coef"].shape == (10, 64)
    c = make_adapter("sgd_classifier", 64, range(10))
    c.set_params(a.get_params())
    assert c.evaluate(test.X, test.y).accuracy == a.evaluate(test.X, test.y).accuracy > 0.8
    with pytest.raises(LocalProtocolError):
        c.set_params({"coef": np.zeros((3, 64)), "intercept": np.zeros(10)})
    with pytest.raises(LocalProtocolError):
        make_adapter("resnet", 64)
    # a local shard missing classes still yields parameters of the job's shape
    only_two = train.y < 2
    c.fit(train.X[only_two], train.y[only_two], epochs=1, learning_rate=0.1, seed=1)
    assert c.get_params()["coef"].shape == (10, 64)
    # the classifier's loss is scikit-learn's log_loss (computed without its input checks)
    from sklearn.metrics import log_loss

    for classes, rows in ((tuple(range(10)), slice(None)), ((3, 8), np.isin(test.y, (3, 8)))):
        d = make_adapter("sgd_classifier", 64, classes)
        d.fit(test.X[rows], test.y[rows], epochs=1, learning_rate=0.1, seed=2)
        proba = d._estimator(0.1, 0).predict_proba(test.X[rows])
        ev = d.evaluate(test.X[rows], test.y[rows])
        assert ev.loss == pytest.approx(log_loss(test.y[rows], y_proba=proba, labels=list(classes)), rel=1e-12)
    for stray in (np.array([9]), np.array([4])):  # above every class; between two classes
        with pytest.raises(LocalProtocolError, match="not among the job's classes"):
            d.evaluate(test.X[:1], stray)
    # regressor: y = 2 x0 - x1 + 0.5
    rng = np.random.default_rng(0)
    Xr = rng.uniform(-1, 1, size=(400, 2))
    yr = 2 * Xr[:, 0] - Xr[:, 1] + 0.5
    r = make_adapter("sgd_regressor", 2)
    r.fit(Xr, yr, epochs=30, learning_rate=0.05, seed=0)
    ev = r.evaluate(Xr, yr)
    assert ev.accuracy > 0.99 and ev.loss < 0.01 and r.get_params()["intercept"].shape == (1,)


def test_dataset_splits_are_seeded_partitions():
    X, y = load_digits_data()
    assert X.shape == (1797, 64) and X.max() <= 1.0 and y.dtype == np.int64
    train, test = train_test_split_fixed(X, y, 0.2, seed=0)
    assert len(train) + len(test) == 1797 and abs(len(test) - 360) <= 10
    assert set(np.unique(test.y)) == set(range(10))
    iid = split_iid(train, 5, seed=1)
    assert sorted(len(s) for s in iid)[-1] - sorted(len(s) for s in iid)[0] <= 1
    assert sum(len(s) for s in iid) == len(train)
    skewed = split_dirichlet(train, 5, alpha=0.5, seed=1)
    again = split_dirichlet(train, 5, alpha=0.5, seed=1)
    assert all(np.array_equal(a.y, b.y) for a, b in zip(skewed, again))
    assert sum(len(s) for s in skewed) == len(train) and min(len(s) for s in skewed) >= 10
    # label skew: with alpha 0.5 some peer holds most of some class; with alpha 1000 none does
    share = max(s.label_counts(10).max() / len(s) for s in skewed)
    flat = max(s.label_counts(10).max() / len(s) for s in split_dirichlet(train, 5, alpha=1000.0, seed=1))
    assert share > 0.3 > flat
    with pytest.raises(LocalProtocolError):
        split_dirichlet(train, 5, alpha=0.0)
    with pytest.raises(LocalProtocolError):
        split_iid(Shard(X[:3], y[:3]), 5)


def test_node_data_files_load_and_bad_files_fail_clearly(tmp_path):
    from chimera.node.datasets import DatasetError, load_dataset

    csv = tmp_path / "data.csv"
    csv.write_text("# digits subset\nf0,label,f1\n0.5,1,2\n1.5,0,3\n")
    shard = load_dataset(csv)
    assert shard.X.tolist() == [[0.5, 2.0], [1.5, 3.0]] and shard.y.tolist() == [1, 0]
    assert shard.y.dtype == np.int64
    np.savez(tmp_path / "data.npz", X=np.eye(3), target=np.array([0.5, 1.0, 2.0]))
    shard = load_dataset(tmp_path / "data.npz", label_column="target")
    assert shard.X.shape == (3, 3) and shard.y.dtype == np.float64
    bad = {
        "ragged.csv": "a,label\n1,2\n3\n",
        "text.csv": "a,label\n1,cat\n",
        "nolabel.csv": "a,b\n1,2\n",
        "empty.csv": "",
        "nan.csv": "a,label\nnan,1\n",
        "data.txt": "a,label\n1,2\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
            load_dataset(tmp_path / name)
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}], dtype=object), y=np.array([1]))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for name in ("obj.npz", "broken.npz", "missing.npz"):
        with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
            load_dataset(tmp_path / name)

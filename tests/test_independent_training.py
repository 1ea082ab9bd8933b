"""The clean-room training participant (tests/independent_training.py, written
from PROTOCOL.md §17 alone) against the reference, bit for bit.

1. §17.1 model hash, update hash, local seed, model spec; §17.2 job values,
   job id, inclusion hash: same bytes as the reference.
2. §17.7: every rule, on many seeded random inputs (ties, duplicate rows,
   equal values, signed zeros, overflow, too few updates, the anomaly screen):
   the same model bytes, model hash, error / credited / flagged verdicts.
3. §17.4 steps 1, 3, 5 over the committed log of a real 4-peer run (one job
   certified by its commit, one by signed confirms): the same certified hash
   per round as the reference nodes' checkpoints.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from chimera.consensus import aggregation as ref
from chimera.consensus import training as reftr

sys.path.insert(0, str(Path(__file__).parent))
import independent_training as it  # noqa: E402

PEERS = sorted(__import__("base64").b32encode(hashlib.sha256(bytes([i])).digest()).decode().rstrip("=").lower()
               for i in range(3))


def test_the_clean_room_module_imports_only_numpy_msgpack_and_the_standard_library():
    tree = ast.parse((Path(__file__).parent / "independent_training.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"numpy", "msgpack"}, roots


# ------------------------------------------------------------------ 1. hashes


def random_tensors(rng: np.random.Generator, max_tensors: int = 4) -> dict[str, np.ndarray]:
    names = rng.choice(["coef", "intercept", "a", "b_2", "Z", "layer.0.w", "x" * 64], size=rng.integers(1, max_tensors + 1),
                       replace=False)
    out = {}
    for name in names:
        ndim = int(rng.integers(0, 9))
        shape = tuple(int(s) for s in rng.integers(0 if rng.random() < 0.1 else 1, 4, size=ndim))
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        arr = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30)).astype(dtype)
        if arr.size and rng.random() < 0.3:
            arr.flat[0] = -0.0
        if rng.random() < 0.2 and arr.ndim >= 2:
            arr = np.asfortranarray(arr)  # not C-contiguous: the hash still uses C order
        out[str(name)] = arr
    return out


def test_model_hash_matches_the_reference_on_many_shapes_and_dtypes():
    rng = np.random.default_rng(1)
    for _ in range(300):
        params = random_tensors(rng)
        mine = it.model_hash(params)
        assert mine == ref.aggregate_hash(params, ref.ModelSpec.of(params))
    # and it is the hash of exactly the §17.1 bytes: a float32 tensor is hashed as float32
    p = {"w": np.array([1.5, -0.0], dtype=np.float32)}
    want = hashlib.sha256(msgpack.packb(["chimera-mesh/fl-params/v1",
                                         [["w", "float32", [2], p["w"].tobytes()]]], use_bin_type=True)).digest()
    assert it.model_hash(p) == want
    assert it.model_hash({"w": p["w"].astype(np.float64)}) != want


@pytest.mark.parametrize("kind,classes", [("sgd_classifier", (0, 1)), ("sgd_classifier", (3, 1, 2)),
                                          ("sgd_classifier", tuple(range(10))), ("sgd_classifier", (5, 5, 1, 2)),
                                          ("sgd_classifier", (4, 4, 7)), ("sgd_regressor", ())])
def test_model_spec_and_zero_model_match_the_reference(kind, classes):
    mine = it.model_spec(kind, 7, classes)
    theirs = {t.name: (t.shape, t.dtype) for t in ref.ModelSpec(
        reftr.JobSpec(name="j", model_kind=kind, n_features=7, classes=classes, rounds=1, learning_rate=0.1,
                      participants=(PEERS[0],), quorum=1, round_deadline_s=1.0).model_spec().tensors).tensors}
    assert mine == theirs
    zero = it.zero_model(mine)
    spec = ref.ModelSpec(tuple(ref.TensorSpec(n, s, d) for n, (s, d) in theirs.items()))
    assert it.model_hash(zero) == ref.aggregate_hash(spec.zeros(), spec)


def ref_job(**kw) -> reftr.JobSpec:
    base = dict(name="j", model_kind="sgd_classifier", n_features=5, classes=(0, 1, 2), rounds=3,
                learning_rate=0.05, participants=tuple(PEERS), quorum=2, round_deadline_s=2.5)
    base.update(kw)
    return reftr.JobSpec(**base)


JOBS = [dict(), dict(rule="krum", byzantine_f=0, quorum=3, seed=2**32 - 1, l2=0.0, dataset="digits:iid"),
        dict(model_kind="sgd_regressor", classes=(), rule="median", byzantine_f=1, quorum=3,
             max_update_norm=12.25, local_epochs=10000),
        dict(detect_anomalies=True, sklearn_version="1.5.2", rule="reputation_clipped", quorum=1),
        dict(rule="trimmed_mean", byzantine_f=1, quorum=3, rounds=1_000_000, learning_rate=1.0)]


@pytest.mark.parametrize("kw", JOBS)
def test_job_values_ids_and_seeds_match_the_reference(kw):
    job = ref_job(**kw)
    theirs = reftr.encode_log_value(job)
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
              ((f, getattr(job, f)) for f in ("name", "model_kind", "n_features", "classes", "l2", "dataset",
                                              "rounds", "local_epochs", "learning_rate", "rule", "byzantine_f",
                                              "detect_anomalies", "participants", "quorum", "round_deadline_s",
                                              "max_update_norm", "seed", "sklearn_version"))}
    mine = it.encode_job(**fields)
    assert mine == theirs
    dec = it.decode_job(theirs)
    assert dec.job_id == reftr.job_id_of(theirs)
    for r in (1, 2, 999_999):
        for p in PEERS:
            assert it.local_seed(dec.job_id, r, dec.seed, p) == reftr.local_seed(job, dec.job_id, r, p)


def test_job_values_the_spec_calls_invalid_are_refused():
    good = it.encode_job(name="j", model_kind="sgd_regressor", n_features=3, rounds=1, learning_rate=0.1,
                         participants=PEERS[:1], quorum=1, round_deadline_s=1.0)
    tag, body = msgpack.unpackb(good)
    reordered = dict(reversed(list(body.items())))
    for bad in (msgpack.packb([tag, reordered]),                                  # keys out of order
                msgpack.packb([tag, {**body, "sklearn_version": ""}]),            # empty version written
                msgpack.packb([tag, {**body, "colour": 1}]),                      # unknown field
                msgpack.packb([tag, {k: v for k, v in body.items() if k != "l2"}]),  # default left out
                msgpack.packb([tag, {**body, "participants": PEERS[::-1]}])):     # not sorted
        with pytest.raises(it.SpecError):
            it.decode_job(bad)
        try:  # the reference: decoding fails, or the value is not canonical (§15.1)
            assert reftr.encode_log_value(reftr.decode_log_value(bad)) != bad
        except reftr.MalformedError:
            pass


def test_update_hash_inclusion_hash_and_values_match_the_reference():
    rng = np.random.default_rng(2)
    spec = ref.ModelSpec((ref.TensorSpec("coef", (3, 4), "float64"), ref.TensorSpec("intercept", (3,), "float32")))
    for k in range(30):
        params = {"coef": rng.standard_normal((3, 4)), "intercept": rng.standard_normal(3).astype(np.float32)}
        upd = reftr.FlUpdate(job_id=bytes(rng.bytes(32)), round=int(rng.integers(1, 10**6 + 1)),
                             epoch=int(rng.integers(0, 2**62)), sender=PEERS[k % 3],
                             tensors=reftr.tensors_from_params(params, spec),
                             num_samples=int(rng.integers(1, 2**40)),
                             loss_before=float(rng.random()) if k % 2 else 0.0,
                             loss_after=float(rng.standard_normal()), accuracy=[0.0, 1.0, 0.5][k % 3],
                             signature=bytes(64))
        body = it.update_body(upd.job_id, upd.round, upd.epoch, upd.sender, params, upd.num_samples,
                              upd.loss_before, upd.loss_after, upd.accuracy)
        assert it.update_hash(body) == reftr.update_hash(upd)
    hashes = sorted(rng.bytes(32) for _ in range(5))
    assert it.inclusion_hash(hashes) == reftr.inclusion_hash(tuple(hashes))
    jid, agg = rng.bytes(32), rng.bytes(32)
    inc = reftr.Inclusion(job_id=jid, round=7, updates=tuple(hashes), aggregate_hash=agg)
    raw = reftr.encode_log_value(inc)
    assert it.encode_inclusion(jid, 7, hashes, agg) == raw
    assert it.decode_inclusion(raw) == it.Inclusion(jid, 7, tuple(hashes), agg)


# ------------------------------------------------------------------ 2. aggregation

MODES = ("normal", "ties", "duplicates", "zeros", "huge", "tiny", "outlier")


def make_case(rng: np.random.Generator, rule: str):
    f = int(rng.integers(0, 3)) if rule not in ("fedavg", "reputation_clipped") else int(rng.integers(0, 2))
    minimum = it.rule_minimum(rule, f)
    n = max(1, minimum + int(rng.integers(-1 if rng.random() < 0.15 else 0, 5)))
    names = ["coef", "intercept"] if rng.random() < 0.7 else ["a", "b", "c"]
    base = {}
    for name in names:
        shape = tuple(int(s) for s in rng.integers(1, 5, size=int(rng.integers(1, 3))))
        dtype = np.float32 if rng.random() < 0.3 else np.float64
        base[name] = (rng.standard_normal(shape) * rng.choice([0.0, 1.0, 1e3])).astype(dtype)
    mode = str(rng.choice(MODES))
    rows = []
    for i in range(n):
        params = {}
        for name, b in base.items():
            if mode == "ties":      # few distinct values: equal values per coordinate, tied Krum scores
                v = b + rng.integers(-2, 3, size=b.shape).astype(b.dtype)
            elif mode == "zeros":
                v = b.copy() if rng.random() < 0.7 else -b
            elif mode == "huge":    # overflow: the rule or the cast fails, the result is the base
                v = (rng.standard_normal(b.shape) * 1e307).astype(np.float64).astype(b.dtype) \
                    if b.dtype == np.float64 else (rng.standard_normal(b.shape) * 3e38).astype(np.float32)
            elif mode == "tiny":
                v = b + (rng.standard_normal(b.shape) * 1e-300).astype(b.dtype)
            else:
                v = b + (rng.standard_normal(b.shape) * 10.0 ** rng.integers(-3, 2)).astype(b.dtype)
            params[name] = np.ascontiguousarray(v, dtype=b.dtype)
        if mode == "duplicates" and i > 0 and rng.random() < 0.5:
            params = {k: v.copy() for k, v in rows[int(rng.integers(0, i))][0].items()}
        if mode == "outlier" and i == 0:
            params = {k: v + np.asarray(50.0, dtype=v.dtype) for k, v in params.items()}
        ns = int(rng.choice([1, 100, 2**40])) if rng.random() < 0.3 else int(rng.integers(1, 5000))
        weight = int(rng.choice([1, 100, 1000])) if rng.random() < 0.5 else int(rng.integers(1, 1001))
        lb, la = float(rng.random()), float(rng.random() * 2)
        rows.append((params, ns, weight, rng.bytes(32), lb, la))
    return f, base, rows, mode


def compare(rule: str, f: int, base, rows, detect: bool = False) -> str:
    senders = [f"peer{i}" for i in range(len(rows))]
    updates = [ref.Update(sender=senders[i], params=p, num_samples=ns, weight=float(w), digest=d,
                          loss_before=lb, loss_after=la) for i, (p, ns, w, d, lb, la) in enumerate(rows)]
    order = sorted(range(len(rows)), key=lambda i: rows[i][3])
    mine_rows = [it.Row(rows[i][0], rows[i][1], rows[i][2], rows[i][4], rows[i][5]) for i in order]
    spec = ref.ModelSpec.of(base)
    config = ref.AggregationConfig(rule=rule, f=f, detect=detect)
    try:
        theirs = ref.aggregate(updates, spec, config, base=base)
    except ref.UpdateRejected:
        with pytest.raises(it.UpdateRejected):
            it.aggregate(base, mine_rows, rule, f, detect_anomalies=detect, isolation_outliers=iforest)
        return "rejected"
    mine = it.aggregate(base, mine_rows, rule, f, detect_anomalies=detect, isolation_outliers=iforest)
    assert (mine.error is None) == (theirs.error is None), (mine.error, theirs.error)
    assert sorted(mine.tensors) == sorted(theirs.params)
    for name in theirs.params:
        assert mine.tensors[name].dtype == theirs.params[name].dtype
        assert mine.tensors[name].tobytes() == theirs.params[name].tobytes(), (rule, name)
    assert mine.digest == theirs.digest
    sender_of = [senders[i] for i in order]
    assert sorted(sender_of[i] for i in mine.credited) == sorted(theirs.senders_credited)
    assert sorted(sender_of[i] for i in mine.flagged) == sorted(theirs.senders_flagged)
    if mine.error is None:
        assert mine.screen_skipped == theirs.screen_skipped
    return "error" if mine.error else "ok"


def iforest(features: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import IsolationForest
    forest = IsolationForest(n_estimators=25, random_state=0, n_jobs=1).fit(features)
    return forest.predict(features) == -1


@pytest.mark.parametrize("rule", it.RULES)
def test_every_rule_gives_the_reference_aggregate_bit_for_bit(rule):
    rng = np.random.default_rng(sum(map(ord, rule)))
    outcomes = {"ok": 0, "error": 0, "rejected": 0}
    for _ in range(400):
        with np.errstate(over="ignore"):
            f, base, rows, _mode = make_case(rng, rule)
        outcomes[compare(rule, f, base, rows)] += 1
    # the random cases reach the success path, the rule's failure path and the rejection
    assert outcomes["ok"] >= 200 and outcomes["error"] >= 5 and outcomes["rejected"] >= 1, outcomes


def test_edge_cases_ties_equal_values_minimum_counts():
    b = {"w": np.zeros(3)}
    d = [bytes([i]) * 32 for i in range(8)]
    same = {"w": np.array([1.0, 2.0, 3.0])}
    # Krum with every row equal: every score ties, the lowest row wins; Multi-Krum takes the first m
    rows = [(same, 10, 1, d[i], 0.0, 0.0) for i in range(5)]
    for rule in ("krum", "multi_krum"):
        assert compare(rule, 1, b, rows) == "ok"
    # two clusters with equal scores
    a1, a2 = {"w": np.array([1.0, 0.0, 0.0])}, {"w": np.array([0.0, 1.0, 0.0])}
    rows = [(a1 if i % 2 else a2, 1, 1, d[i], 0.0, 0.0) for i in range(6)]
    for rule in ("krum", "multi_krum", "median", "trimmed_mean", "reputation_clipped", "fedavg"):
        assert compare(rule, 1, b, rows) == "ok"
    # exactly the minimum, and one short of it (the base model, with an error)
    for rule in ("krum", "multi_krum", "median", "trimmed_mean"):
        m = it.rule_minimum(rule, 2)
        rows = [({"w": np.array([float(i), -float(i), 0.5])}, 1, 1, d[i], 0.0, 0.0) for i in range(m)]
        assert compare(rule, 2, b, rows) == "ok"
        assert compare(rule, 2, b, rows[:-1]) == "error"
    # signed zeros: 0 + (-0) = +0 in wsum's accumulator
    neg = {"w": np.array([-0.0, -0.0, 1.0])}
    for rule in it.RULES:
        assert compare(rule, 0, {"w": np.array([-0.0, 0.0, 0.0])}, [(neg, 1, 1, d[i], 0.0, 0.0) for i in range(3)]) == "ok"
    # NaN / inf in an update: rejected on both sides
    for bad in (np.nan, np.inf, -np.inf):
        rows = [({"w": np.array([bad, 0.0, 0.0])}, 1, 1, d[0], 0.0, 0.0)]
        assert compare("fedavg", 0, b, rows) == "rejected"


def test_the_norm_bound_accepts_and_rejects_alike_at_the_bound():
    rng = np.random.default_rng(4)
    spec = None
    for _ in range(100):
        base = {"coef": rng.standard_normal((2, 5)), "intercept": rng.standard_normal(2).astype(np.float32)}
        upd = {k: (v + rng.standard_normal(v.shape).astype(v.dtype)).astype(v.dtype) for k, v in base.items()}
        spec = ref.ModelSpec.of(base)
        bound = it.norm(it.flatten(upd) - it.flatten(base))
        for limit in (bound, np.nextafter(bound, 0.0), np.nextafter(bound, 1e300)):
            try:
                ref.validate_update(upd, spec, base=base, max_norm=float(limit))
                theirs = True
            except ref.UpdateRejected:
                theirs = False
            try:
                it.validate_update(base, upd, float(limit))
                mine = True
            except it.UpdateRejected:
                mine = False
            assert mine == theirs == (limit >= bound)


def test_the_anomaly_screen_flags_the_same_rows():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(5)
    flagged_any = 0
    for k in range(40):
        n = int(rng.integers(3, 9))
        base = {"w": rng.standard_normal(6)}
        rows = []
        for i in range(n):
            p = {"w": base["w"] + rng.standard_normal(6) * 0.1}
            if i < 1 + k % 2:
                p = {"w": base["w"] - 20.0 * rng.standard_normal(6)}
            rows.append((p, int(rng.integers(1, 100)), int(rng.integers(1, 1000)), rng.bytes(32),
                         float(rng.random()), float(rng.random())))
        rule = it.RULES[k % len(it.RULES)]
        f = 1 if rule in ("krum", "multi_krum", "median", "trimmed_mean") else 0
        compare(rule, f, base, rows, detect=True)
        order = sorted(range(n), key=lambda i: rows[i][3])
        X = np.stack([rows[i][0]["w"] - base["w"] for i in order])
        flagged_any += bool(it.screen(X, [rows[i][5] - rows[i][4] for i in order], iforest))
    assert flagged_any >= 10


def test_reductions_follow_the_spec_examples():
    e = 2.0 ** -54
    assert float(it.tree(np.array([1.0] + [e] * 7))) == 1.0 + 2.0 ** -52
    assert it.seq([1.0] + [e] * 7) == 1.0
    for k in range(0, 40):
        v = np.random.default_rng(k).standard_normal(k) * 1e10
        assert float(it.tree(v)) == ref.tree_sum(v)
        assert it.seq(v) == ref.sequential_sum(v)


def adversarial_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Rows whose sums depend on the order of addition: mixed signs and magnitudes 1e-8 .. 1e8."""
    return rng.standard_normal((n, d)) * 10.0 ** rng.integers(-8, 9, size=(n, d))


def test_distances_scores_norms_and_weighted_medians_match_the_reference_bit_for_bit():
    """The rules above mostly select rows, so a distance or score off by one ulp rarely
    shows in their result: compare the intermediate quantities themselves."""
    rng = np.random.default_rng(6)
    for _ in range(60):
        n, d = int(rng.integers(3, 9)), int(rng.choice([1, 2, 3, 7, 8, 9, 31, 33, 257, 1000]))
        X = adversarial_rows(rng, n, d)
        assert it.sq_distances(X).tobytes() == ref.pairwise_sq_distances(X).tobytes()
        f = int(rng.integers(0, (n - 3) // 2 + 1))
        assert np.array(it.krum_scores(X, f)).tobytes() == ref.krum_scores(X, f).tobytes()
        assert np.array([it.norm(x) for x in X]).tobytes() == np.sqrt(ref.row_dots(X)).tobytes()
        assert np.array([float(it.tree(x * x)) for x in X]).tobytes() == ref.row_dots(X).tobytes()
        w = rng.integers(1, 1000, size=n).astype(np.float64)
        assert it.wmed_columns(X, w).tobytes() == ref.weighted_coordinate_median(X, w).tobytes()
        assert it.wsum(X, w).tobytes() == ref._weighted_sum(X, w).tobytes()
    # the order matters on such rows: a left-to-right sum differs somewhere
    X = adversarial_rows(np.random.default_rng(7), 50, 1000)
    assert any(float(it.tree(x * x)) != float(np.add.reduce(list(x * x))) for x in X)


# ------------------------------------------------------------------ 3. the round rules over a real log

JOB_TOML = """
[job]
name = "{name}"
model_kind = "sgd_classifier"
n_features = 64
classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
rounds = {rounds}
local_epochs = 1
learning_rate = 0.1
quorum = {quorum}
round_deadline_s = 2.0
max_update_norm = 1000.0
seed = 3
"""


def stored_blocks(data_dir: Path) -> list[tuple[int, int, list[bytes]]]:
    from chimera.node.consensus import _unpack_commit

    db = sqlite3.connect(f"file:{data_dir / 'node.sqlite3'}?mode=ro", uri=True)
    try:
        blobs = [bytes(b) for (b,) in db.execute("SELECT commit_blob FROM blocks ORDER BY height")]
    finally:
        db.close()
    out = []
    for blob in blobs:
        block = _unpack_commit(blob).block
        out.append((block.height, block.epoch, [bytes(v) for v in block.values]))
    return out


def nacl_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    import nacl.exceptions
    import nacl.signing

    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
        return True
    except nacl.exceptions.BadSignatureError:
        return False


@pytest.mark.slow
def test_round_starts_inclusions_and_certified_hashes_over_a_real_log_match_the_reference(tmp_path):
    """4 peer processes, two jobs at once: one of every validator (each round certified by its
    inclusion's commit, §17.4 step 5 fast path) and one of 2 of the 4 (outside weight 1/2 > 1/3:
    certified by signed fl_confirm values). From peer 0's stored log alone, follow_job must find
    the certified hash of every round that the reference nodes checkpointed, and the exported
    model must hash (§17.1) to the last one."""
    from chimera.node.launcher import LocalNetwork
    from tests.conftest import wait_until
    from tests.test_consensus_node import PROCESS_FAST

    net = LocalNetwork(tmp_path, 4, extra_args=PROCESS_FAST + [
        "--set", "training_digits_shard=genesis", "--set", "training_fetch_interval_s=0.5"], epoch_length=1000)
    try:
        net.start()
        assert wait_until(net.full_mesh, timeout_s=60), "no full mesh"
        ids = sorted(net.query(i, "status")["peer_id"] for i in range(4))
        all_job = net.query(0, "train_start", {"job": JOB_TOML.format(name="all", rounds=2, quorum=3),
                                               "timeout_s": 60})["job_id"]
        pair = json.dumps(ids[:2])
        sub_job = net.query(0, "train_start", {"job": JOB_TOML.format(name="pair", rounds=3, quorum=2)
                                               + f"participants = {pair}\n", "timeout_s": 60})["job_id"]

        def finished(i: int, job: str) -> bool:  # and the last round's row written (rows land behind it)
            doc = net.query(i, "train_status", {"job": job})["jobs"][0]
            return doc.get("state") == "finished" and bool(doc.get("rounds")) \
                and doc["rounds"][-1]["accuracy"] is not None

        assert wait_until(lambda: all(finished(i, j) for i in range(4) for j in (all_job, sub_job)),
                          timeout_s=90, interval_s=0.2), "jobs did not finish"
        docs = {j: [net.query(i, "train_status", {"job": j})["jobs"][0] for i in range(4)] for j in (all_job, sub_job)}
        exported = net.query(0, "train_export", {"job": sub_job})
        blocks = stored_blocks(net.peers[0].data_dir)
        network_id = net.network.network_id
    finally:
        net.stop()
    values = [v for _h, _e, vs in blocks for v in vs]
    assert {_e for _h, _e, _vs in blocks} == {0}  # one epoch: its table is the genesis one
    tables = {0: {p: 1000 for p in ids}}
    for job, rounds, fast in ((all_job, 2, True), (sub_job, 3, False)):
        job_value = next(v for v in values if hashlib.sha256(v).hexdigest() == job)
        verdicts = it.follow_job(job_value, blocks, tables, network_id, nacl_verify)
        reference = {r["round"]: r["digest"] for r in docs[job][0]["rounds"]}
        # (failed once in a fresh-clone CI run on 2026-12-03, not reproduced in 11 runs since, 8 of
        # them under CPU load: the rows of every peer are shown when it fails again)
        assert all({r["round"]: r["digest"] for r in d["rounds"]} == reference for d in docs[job]), \
            [[(r["round"], r["digest"], r["participants"], r["committed_ms"]) for r in d["rounds"]]
             for d in docs[job]]
        assert len(reference) == rounds
        assert [(v.round, v.certified_hash.hex() if v.certified_hash else None) for v in verdicts] == \
            sorted(reference.items())
        assert all(v.fast_path == fast for v in verdicts)
        if not fast:  # certified by the confirms of both participants (2 of 2 needed)
            assert all(sorted(v.voters) == ids[:2] for v in verdicts)
        for a, b in zip(verdicts, verdicts[1:]):  # each round starts where the previous one certified
            assert b.start == a.certified_at and b.base_hash == a.certified_hash
            assert b.inclusion_at > b.start
    import io
    with np.load(io.BytesIO(exported["npz"]), allow_pickle=False) as npz:
        model = {k: npz[k] for k in npz.files}
    assert it.model_hash(model).hex() == exported["digest"] == docs[sub_job][0]["rounds"][-1]["digest"]


def test_round_rules_over_random_logs_match_the_reference_core():
    """Synthetic committed logs (values built by the clean-room encoders, signed with real
    keys): inclusions of every size, of past/future rounds and other jobs; confirms before and
    after their inclusion, for other inclusions, with bad signatures, by non-participants,
    repeated; epochs whose validators outside the job hold more or less than 1/3 (fast path or
    not). A reference follower (TrainingCore, fed the same values with each block's epoch)
    and follow_job must certify the same hash for every round and start each with the same epoch."""
    from chimera.consensus.quorum import WeightTable
    from chimera.protocol.identity import SigningIdentity

    rng = np.random.default_rng(8)
    network_id = bytes(range(16))
    keys = [SigningIdentity(hashlib.sha256(b"k%d" % i).digest()) for i in range(6)]
    by_id = {k.peer_id: k for k in keys}
    follower = SigningIdentity(hashlib.sha256(b"follower").digest())
    certified_rounds = fast_rounds = 0
    for case in range(60):
        ids = sorted(by_id)
        equal = case % 3 == 0  # 3 participants of equal weight: 2 of them hold exactly 2/3, not more
        participants = sorted(rng.choice(ids, size=3 if equal else int(rng.integers(2, 6)), replace=False).tolist())
        quorum = int(rng.integers(1, len(participants) + 1))
        job_value = it.encode_job(name=f"c{case}", model_kind="sgd_regressor", n_features=2, rounds=3,
                                  learning_rate=0.1, participants=participants, quorum=quorum,
                                  round_deadline_s=1.0)
        job_id = hashlib.sha256(job_value).digest()
        epoch_length = 3
        tables = {}
        for e in range(8):  # every validator, or with more weight outside the job
            heavy = case % 2 and rng.random() < 0.8  # the validators outside the job weigh more
            tables[e] = {p: (1000 if equal else int(rng.integers(1, 1000))) * (1 if p in participants or not heavy else 5)
                         for p in ids if p in participants or heavy or rng.random() < 0.5}
        pool = [bytes([i]) * 32 for i in range(3)]  # aggregate hashes
        made: list[tuple[int, tuple[bytes, ...]]] = []
        blocks = []
        for height in range(1, 25):
            epoch = (height - 1) // epoch_length
            # steer some confirms at the round in progress (as participants would confirm it)
            steer = None
            if blocks:
                last = it.follow_job(job_value, blocks, tables, network_id, nacl_verify)[-1]
                steer = last if last.inclusion is not None and last.certified_hash is None else None
            values = [job_value] if height == 1 else []
            for _ in range(int(rng.integers(0, 7))):
                rnd = int(rng.integers(1, 5))
                if rng.random() < 0.25:
                    k = int(rng.integers(max(0, quorum - 1), len(participants) + 2))
                    ups = tuple(sorted(rng.bytes(32) for _ in range(k)))
                    made.append((rnd, ups))
                    jid = job_id if rng.random() < 0.9 else bytes(32)
                    values.append(it.encode_inclusion(jid, rnd, ups, pool[int(rng.integers(0, 3))]))
                else:
                    if steer is not None and rng.random() < 0.6:  # the round's committed inclusion
                        rnd, ups = steer.round, steer.inclusion.updates
                        ihash = it.inclusion_hash(ups)
                    elif made and rng.random() < 0.9:  # mostly the newest inclusions
                        rnd, ups = made[max(0, len(made) - 1 - int(rng.integers(0, 3)))]
                        ihash = it.inclusion_hash(ups)
                    else:
                        ihash = rng.bytes(32)
                    voter = str(rng.choice(participants if rng.random() < 0.9 else ids))
                    agg = pool[0] if rng.random() < 0.7 else pool[int(rng.integers(0, 3))]
                    sign_epoch = steer.epoch if steer is not None and rng.random() < 0.7 else \
                        max(0, epoch - int(rng.choice([0, 0, 1, 2])))
                    sig = by_id[voter].sign(it.vote_bytes("fl_confirm", network_id, sign_epoch,
                                                          it.confirm_statement(job_id, rnd, ihash, agg)))
                    if rng.random() < 0.1:
                        sig = bytes(64)
                    values.append(it.encode_confirm(job_id, rnd, ihash, agg, voter, sig))
            values = sorted(set(values), key=lambda v: hashlib.sha256(v).digest())
            if height == 1:  # the job first: values before it in its block are not this job's
                values.remove(job_value)
                values.insert(0, job_value)
            blocks.append((height, epoch, values))
        core = reftr.TrainingCore.for_committed_job(
            follower, network_id, job_value, {e: WeightTable(e, t) for e, t in tables.items()}, 0.0, epoch=0)
        for height, epoch, values in blocks:
            for v in values:
                if v != job_value:
                    core.on_committed(v, 0.0, epoch=epoch)
        verdicts = it.follow_job(job_value, blocks, tables, network_id, nacl_verify)
        mine = {v.round: v.certified_hash for v in verdicts if v.certified_hash}
        theirs = {r: core.certified_hash(r) for r in (1, 2, 3) if core.certified_hash(r)}
        assert mine == theirs, case
        assert {v.round: v.epoch for v in verdicts} == \
            {r: core._rounds[r].epoch for r in core._rounds if core._rounds[r].epoch is not None}, case
        certified_rounds += len(mine)
        fast_rounds += sum(v.fast_path for v in verdicts if v.certified_hash)
    # both paths are exercised
    assert certified_rounds >= 40 and 10 <= fast_rounds <= certified_rounds - 10, (certified_rounds, fast_rounds)


def test_a_flood_of_one_participants_confirms_does_not_hide_the_honest_ones():
    """PROTOCOL §17.4 step 5: confirms held before the inclusion are bounded per participant
    (4), so one participant's 256 confirms cannot crowd out the others' (releases before
    2026-12-02 held 256 per round whoever signed them: the round never certified)."""
    from chimera.consensus.quorum import WeightTable
    from chimera.protocol.identity import SigningIdentity

    keys = sorted((SigningIdentity(hashlib.sha256(b"k%d" % i).digest()) for i in range(5)), key=lambda k: k.peer_id)
    ids = [k.peer_id for k in keys]
    network_id = bytes(16)
    job = it.encode_job(name="flood", model_kind="sgd_regressor", n_features=2, rounds=2, learning_rate=0.1,
                        participants=ids[:4], quorum=3, round_deadline_s=1.0)
    job_id = hashlib.sha256(job).digest()
    tables = {0: {**{p: 1000 for p in ids[:4]}, ids[4]: 3000}}  # outside weight 3/7 > 1/3: confirms certify
    ups = tuple(sorted(bytes([i]) * 32 for i in range(3)))
    ihash, good = it.inclusion_hash(ups), bytes([9]) * 32

    def confirm(key, agg: bytes) -> bytes:
        sig = key.sign(it.vote_bytes("fl_confirm", network_id, 0, it.confirm_statement(job_id, 1, ihash, agg)))
        return it.encode_confirm(job_id, 1, ihash, agg, key.peer_id, sig)

    flood = [confirm(keys[0], hashlib.sha256(b"%d" % i).digest()) for i in range(256)]
    honest = [confirm(k, good) for k in keys[1:4]]
    blocks = [(1, 0, [job]), (2, 0, flood[:200]), (3, 0, flood[200:] + honest),
              (4, 0, [it.encode_inclusion(job_id, 1, ups, good)])]
    verdicts = it.follow_job(job, blocks, tables, network_id, nacl_verify)
    assert verdicts[0].certified_hash == good  # the spec's rule: 3 of 4 participants' weight
    core = reftr.TrainingCore.for_committed_job(SigningIdentity(hashlib.sha256(b"f").digest()), network_id, job,
                                                {0: WeightTable(0, tables[0])}, 0.0, epoch=0)
    for _h, epoch, values in blocks[1:]:
        for v in values:
            core.on_committed(v, 0.0, epoch=epoch)
    assert core.certified_hash(1) == good


def test_a_participants_fifth_held_confirm_is_ignored_by_both_and_a_later_one_counts():
    """The per-participant bound of held confirms is a rule of the log (every peer applies it
    at the same point): a participant's 5th confirm committed before the inclusion does not
    count even when it is its first valid one; one committed after the inclusion does."""
    from chimera.consensus.quorum import WeightTable
    from chimera.protocol.identity import SigningIdentity

    keys = sorted((SigningIdentity(hashlib.sha256(b"h%d" % i).digest()) for i in range(5)), key=lambda k: k.peer_id)
    ids = [k.peer_id for k in keys]
    network_id = bytes(16)
    job = it.encode_job(name="held", model_kind="sgd_regressor", n_features=2, rounds=2, learning_rate=0.1,
                        participants=ids[:4], quorum=3, round_deadline_s=1.0)
    job_id = hashlib.sha256(job).digest()
    tables = {0: {**{p: 1000 for p in ids[:4]}, ids[4]: 3000}}  # confirms certify (no fast path)
    ups = tuple(sorted(bytes([i]) * 32 for i in range(3)))
    ihash, good = it.inclusion_hash(ups), bytes([9]) * 32

    def confirm(key, agg: bytes, inclusion: bytes = ihash) -> bytes:
        statement = it.confirm_statement(job_id, 1, inclusion, agg)
        sig = key.sign(it.vote_bytes("fl_confirm", network_id, 0, statement))
        return it.encode_confirm(job_id, 1, inclusion, agg, key.peer_id, sig)

    other = [confirm(keys[1], good, hashlib.sha256(b"other %d" % i).digest()) for i in range(4)]
    blocks = [(1, 0, [job]),
              (2, 0, other + [confirm(keys[1], good), confirm(keys[2], good), confirm(keys[3], good)]),
              (3, 0, [it.encode_inclusion(job_id, 1, ups, good)]),
              (4, 0, [confirm(keys[1], good)])]  # not held: counted at once
    core = reftr.TrainingCore.for_committed_job(SigningIdentity(hashlib.sha256(b"g").digest()), network_id, job,
                                                {0: WeightTable(0, tables[0])}, 0.0, epoch=0)
    for upto, expected in ((3, None), (4, good)):
        verdicts = it.follow_job(job, blocks[:upto], tables, network_id, nacl_verify)
        assert verdicts[0].certified_hash == expected, upto
    for height, epoch, values in blocks[1:]:
        for v in values:
            core.on_committed(v, 0.0, epoch=epoch)
        assert core.certified_hash(1) == (good if height == 4 else None), height
    assert core.drops["confirm_overflow"] == 1

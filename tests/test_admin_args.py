"""Bad admin arguments, duplicate map keys, bad training jobs and hostile data files
all end as one clear error (usage errors: code 2), never as an internal error, a
silently chosen value, or an allocation sized by the input."""

from __future__ import annotations

import asyncio
import io
import math
import os
import sqlite3
import time
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from chimera.node import admin
from chimera.node.admin import EXIT_USAGE, AdminError, AdminServer
from chimera.node.admin_keys import REQUEST_DOMAIN, generate_key, public_bytes
from chimera.node.config import NodeConfig
from chimera.protocol.identity import SigningIdentity, fingerprint

from conftest import FAST


# ------------------------------------------------------------------ the helpers


def test_int_arg_accepts_only_ints_in_range_and_names_the_argument():
    from chimera.node.admin import int_arg

    assert int_arg({"limit": 7}, "limit", 50, 1, 10) == 7
    assert int_arg({}, "limit", 50, 1, 10) == 50
    assert int_arg({"limit": None}, "limit", 50, 1, 10) == 50  # nil: absent
    assert int_arg({}, "from_height", None, 1, 10) is None
    for value in [math.inf, -math.inf, math.nan, True, 1.5, 5.0, "5", b"5", [5], {"a": 1}, 2**63, -1, 0, 11]:
        with pytest.raises(AdminError, match="^limit ") as err:
            int_arg({"limit": value}, "limit", 50, 1, 10)
        assert err.value.code == EXIT_USAGE
    with pytest.raises(AdminError, match="missing argument 'height'") as err:
        int_arg({}, "height", lo=1)
    assert err.value.code == EXIT_USAGE
    assert int_arg({"h": 2**63 - 1}, "h") == 2**63 - 1  # the default range is SQLite's
    with pytest.raises(AdminError):
        int_arg({"h": 2**63}, "h")


def test_float_str_and_bool_args_refuse_wrong_types():
    from chimera.node.admin import bool_arg, float_arg, str_arg

    assert float_arg({"t": 3}, "t", 1.0, 0.1, 600.0) == 3.0 and float_arg({}, "t", 1.0, 0.1, 600.0) == 1.0
    for value in [math.inf, -math.inf, math.nan, True, "3", 0.0, 601, 10**400]:
        with pytest.raises(AdminError, match="^t ") as err:
            float_arg({"t": value}, "t", 1.0, 0.1, 600.0)
        assert err.value.code == EXIT_USAGE
    assert str_arg({"k": "x"}, "k") == "x"
    for value in [5, b"x", ["x"], "x" * 65]:
        with pytest.raises(AdminError, match="^k ") as err:
            str_arg({"k": value}, "k", max_len=64)
        assert err.value.code == EXIT_USAGE
    with pytest.raises(AdminError, match="one of"):
        str_arg({"k": "z"}, "k", choices=("a", "b"))
    assert bool_arg({"w": True}, "w") is True and bool_arg({}, "w") is False
    for value in [1, "yes", "true", 1.0]:
        with pytest.raises(AdminError, match="^w must be true or false"):
            bool_arg({"w": value}, "w")


# ------------------------------------------------------- dispatch (no node needed)


def _server(tmp_path: Path, ran: list) -> AdminServer:
    async def stop(args: dict) -> dict:
        ran.append("stop")
        return {"stopping": True}

    async def status(args: dict) -> dict:
        ran.append("status")
        return {"ok": 1}

    db = sqlite3.connect(":memory:", isolation_level=None)
    return AdminServer(tmp_path / "admin.sock", {"stop": stop, "status": status}, db=db, node_fingerprint="me")


async def test_audit_limit_of_the_wrong_type_is_a_usage_error_not_an_internal_one(tmp_path: Path):
    server = _server(tmp_path, [])
    for value in [math.inf, -math.inf, math.nan, True, 1.5, "50", 2**63, 2**64 - 1, -(2**63), 0, 10_001]:
        reply, _ = await server.dispatch(msgpack.packb({"cmd": "audit", "args": {"limit": value}}), "local")
        assert reply["ok"] is False and reply["code"] == EXIT_USAGE, (value, reply)
        assert "internal error" not in reply["error"] and reply["error"].startswith("limit "), reply
    reply, _ = await server.dispatch(msgpack.packb({"cmd": "audit", "args": {"limit": 3}}), "local")
    assert reply["ok"] is True and len(reply["result"]) == 3


def _raw_map(*pairs) -> bytes:
    """A msgpack map written pair by pair (so a key can repeat)."""
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(len(pairs)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in pairs)


async def test_a_local_request_with_a_duplicate_key_runs_nothing_and_is_audited(tmp_path: Path):
    ran: list = []
    server = _server(tmp_path, ran)
    frame = b"\x82\xa3cmd\xa6status\xa3cmd\xa4stop"  # {"cmd": "status", "cmd": "stop"}
    assert frame == _raw_map(("cmd", "status"), ("cmd", "stop"))
    reply, stream = await server.dispatch(frame, "local")
    assert stream is None and reply["ok"] is False and reply["code"] == EXIT_USAGE
    assert "duplicate" in reply["error"]
    nested = _raw_map(("cmd", "status"), ("args", {})).replace(b"\x80", _raw_map(("a", 1), ("a", 2)))
    reply, _ = await server.dispatch(nested, "local")  # a duplicate inside args too
    assert reply["code"] == EXIT_USAGE and "duplicate" in reply["error"]
    assert ran == []
    rows = server.audit.rows(10)  # unreadable requests from one source within a second share a row
    assert {r["result"] for r in rows} == {"error: duplicate map key"} and sum(r["count"] for r in rows) == 2


async def test_a_signed_request_with_a_duplicate_key_is_a_usage_error(tmp_path: Path):
    ran: list = []
    server = _server(tmp_path, ran)
    key = generate_key()
    server.keys.add("ops", "admin", public_bytes(key), time.time_ns() // 1_000_000)
    signed = _raw_map(("node", "me"), ("key", fingerprint(public_bytes(key))), ("cmd", "status"),
                      ("args", {}), ("nonce", os.urandom(16)), ("sent_at_ms", time.time_ns() // 1_000_000),
                      ("cmd", "stop"))
    body = msgpack.packb({"signed": signed, "sig": key.sign(REQUEST_DOMAIN + signed)}, use_bin_type=True)
    reply, _ = await server.dispatch(body, "local")
    assert reply["ok"] is False and reply["code"] == EXIT_USAGE and "duplicate" in reply["error"]
    assert ran == []
    row = server.audit.rows(1)[0]
    assert "duplicate" in row["result"] and row["result"].startswith("error:")


# --------------------------------------------------------- handlers of a real node


async def test_node_handlers_refuse_non_finite_and_mistyped_numbers(node_factory):
    node = await node_factory("a", NodeConfig(**FAST, fabric_probe_gpus=0))

    async def code_of(cmd: str, args: dict) -> int:
        try:
            await asyncio.to_thread(admin.call, node.data_dir, cmd, args, 20.0)
        except AdminError as exc:
            assert "internal error" not in str(exc), (cmd, args, str(exc))
            return exc.code
        return 0

    for value in [math.inf, -math.inf, True, 2.0, "10"]:
        assert await code_of("events", {"limit": value}) == EXIT_USAGE, value
        assert await code_of("tasks_status", {"limit": value}) == EXIT_USAGE, value
        assert await code_of("tasks_submit", {"replicas": value}) == EXIT_USAGE, value
    for value in [math.inf, -math.inf, math.nan, True, "10"]:
        assert await code_of("agents_call", {"name": "x", "reply_wait_s": value}) == EXIT_USAGE, value
    assert await code_of("tasks_submit", {"fuel": 1.5}) == EXIT_USAGE  # was silently 1
    assert await code_of("tasks_submit", {"wait": "yes"}) == EXIT_USAGE
    assert await code_of("tasks_submit", {"threshold": "inf"}) == EXIT_USAGE
    assert await code_of("tasks_submit", {}) == EXIT_USAGE  # no module
    assert await code_of("tasks_status", {"task_id": ["x"]}) == EXIT_USAGE
    assert await code_of("audit", {"limit": math.inf}) == EXIT_USAGE
    assert await code_of("revoke_peer", {"peer_id": 5}) == EXIT_USAGE
    assert await code_of("config_get", {"field": ["port"]}) == EXIT_USAGE
    # a misspelt event kind matched nothing, silently (and forever under events_follow)
    for kind in ("decison_committed", "peer_failed,nope", ",", "", ["peer_failed", "x"], []):
        with pytest.raises(AdminError, match="kind") as err:
            await asyncio.to_thread(admin.call, node.data_dir, "events", {"kind": kind}, 20.0)
        assert err.value.code == EXIT_USAGE and "decision_committed" in str(err.value), kind
    assert await code_of("events", {"kind": "peer_failed, decision_committed"}) == 0
    assert await code_of("events", {"kind": ["reputation_changed"]}) == 0
    client = admin.LocalClient(node.data_dir / admin.SOCKET_NAME)
    for args in ({"max_events": math.inf}, {"duration_s": math.nan}, {"min_priority": ["x"]},
                 {"kind": "peer_faild"}):
        with pytest.raises(AdminError) as err:
            await asyncio.to_thread(lambda: list(client.follow("events_follow", args)))
        assert err.value.code == EXIT_USAGE, args
    assert (await asyncio.to_thread(admin.call, node.data_dir, "status"))["peer_id"] == node.peer_id


def test_a_threshold_text_is_matched_before_fraction_parses_it():
    from fractions import Fraction

    from chimera.node.fabric import _threshold_arg

    started = time.monotonic()
    for text in ("1e99999999", "9" * 5000, "inf", "nan", "1/0", "2", "-1/2", "0", " ", "0x1"):
        with pytest.raises(AdminError) as err:
            _threshold_arg({"threshold": text})
        assert err.value.code == EXIT_USAGE
    assert time.monotonic() - started < 1.0
    assert _threshold_arg({"threshold": "2/3"}) == Fraction(2, 3)
    assert _threshold_arg({"threshold": 0.75}) == Fraction(3, 4)
    assert _threshold_arg({}) is None


# ------------------------------------------------------------------ training jobs


def _service(tmp_path: Path, max_message_bytes: int = 1 << 20):
    from chimera.node.store import Store
    from chimera.node.training_service import TrainingService

    me = SigningIdentity.generate().peer_id
    data_dir = tmp_path / "peer"
    data_dir.mkdir()
    node = SimpleNamespace(peer_id=me, data_dir=data_dir, store=Store(data_dir), counters=Counter(),
                           consensus=None, network=SimpleNamespace(genesis=(me,)),
                           config=SimpleNamespace(max_message_bytes=max_message_bytes, training_test_poison="",
                                                  training_test_drop_updates_from=""))
    return TrainingService(node, 0)


def _job(**changes) -> dict:
    others = sorted(SigningIdentity.generate().peer_id for _ in range(3))
    job = {"name": "j", "model_kind": "sgd_classifier", "n_features": 64, "classes": list(range(10)),
           "dataset": "digits", "rounds": 2, "learning_rate": 0.1, "round_deadline_s": 5.0,
           "participants": others}
    job.update(changes)
    return {k: v for k, v in job.items() if v is not ...}


@pytest.mark.parametrize("field,value", [
    ("n_features", 10**12), ("n_features", "64"), ("n_features", 1e30), ("n_features", None),
    ("n_features", True), ("n_features", -1), ("n_features", 0), ("n_features", 64.0), ("n_features", ...),
    ("l2", math.inf), ("l2", math.nan), ("l2", -1.0), ("l2", "0.1"), ("learning_rate", math.inf),
    ("round_deadline_s", None), ("rounds", 0), ("rounds", 10**9), ("seed", 2**40), ("classes", "0123"),
    ("classes", [0, 1.5]), ("byzantine_f", math.inf), ("byzantine_f", "1"), ("detect_anomalies", 1),
    ("participants", ["not a peer id"]), ("name", "x" * 65), ("quorum", 10**30),
])
async def test_a_bad_job_field_is_a_usage_error_naming_the_field(tmp_path: Path, field, value):
    svc = _service(tmp_path)
    with pytest.raises(AdminError) as err:
        await svc.start_job(_job(**{field: value}), 5.0)
    assert err.value.code == EXIT_USAGE
    assert field in str(err.value) and "0 parameter bytes" not in str(err.value), str(err.value)


async def test_a_job_file_in_toml_is_checked_the_same_way(tmp_path: Path):
    svc = _service(tmp_path)
    text = "[job]\n" + "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in _job(n_features=10**12).items())
    with pytest.raises(AdminError, match=r"n_features: 1000000000000 outside \[1, 1048576\]") as err:
        await svc.start_job(text, 5.0)
    assert err.value.code == EXIT_USAGE
    for raw in ("[job\n", "job = 5\n", "a = " + "[" * 5000 + "]" * 5000 + "\n", "n_features = " + "9" * 5000,
                7, {"job": [1]}, _job(n_features=10**5000)):
        with pytest.raises(AdminError) as err:
            await svc.start_job(raw, 5.0)
        assert err.value.code == EXIT_USAGE, raw


async def test_a_model_too_large_for_this_node_is_refused_before_anything_is_allocated(tmp_path: Path):
    from chimera.node.training_service import param_bytes

    svc = _service(tmp_path)
    big = _job(n_features=1 << 20, classes=list(range(1024)))  # 8 GiB of float64: within JobSpec's bounds
    expected = "sgd_classifier with n_features 1048576 and 1024 classes has 8589942784 parameter bytes"
    with pytest.raises(AdminError, match=expected) as err:
        await svc.start_job(big, 5.0)
    assert err.value.code == EXIT_USAGE
    job = svc.job_from_args(_job(n_features=10, classes=[3, 7]))
    assert param_bytes(job) == sum(t.nbytes for t in job.model_spec().tensors) == 8 * 11
    for kind, classes in (("sgd_classifier", list(range(5))), ("sgd_regressor", [])):
        job = svc.job_from_args(_job(model_kind=kind, n_features=33, classes=classes))
        assert param_bytes(job) == sum(t.nbytes for t in job.model_spec().tensors)


def test_a_classifier_names_the_row_of_a_label_that_is_no_class_id():
    from chimera.consensus.training import JobSpec
    from chimera.node.training_service import check_class_labels
    from chimera.protocol.errors import LocalProtocolError

    peer = SigningIdentity.generate().peer_id
    job = JobSpec(name="j", model_kind="sgd_classifier", n_features=2, classes=(0, 1), dataset="d", rounds=1,
                  learning_rate=0.1, participants=(peer,), quorum=1, round_deadline_s=1.0)
    check_class_labels(job, np.array([0, 1, 1]), "training data")
    with pytest.raises(LocalProtocolError, match=r"training data: label of row 2 is 0\.5, not an integer"):
        check_class_labels(job, np.array([0.0, 1.0, 0.5]), "training data")
    with pytest.raises(LocalProtocolError, match="label of row 1 is 7, not one of the job's classes"):
        check_class_labels(job, np.array([0, 7]), "test data")
    regressor = JobSpec(name="j", model_kind="sgd_regressor", n_features=2, dataset="d", rounds=1,
                        learning_rate=0.1, participants=(peer,), quorum=1, round_deadline_s=1.0)
    check_class_labels(regressor, np.array([0.5, 2.25]), "training data")  # a regressor's targets


# ------------------------------------------------------------------ data files


def test_a_huge_csv_label_is_refused_not_wrapped(tmp_path: Path):
    from chimera.node.datasets import DatasetError, load_dataset

    path = tmp_path / "data.csv"
    path.write_text("f0,label\n0.5,1\n1.5,99999999999999999999999\n")
    with pytest.raises(DatasetError, match=r"data\.csv: label of row 1 \(column 'label'\) is 1e\+23"):
        load_dataset(path)
    path.write_text("f0,label\n0.5,1\n1.5,-3\n")
    assert load_dataset(path).y.tolist() == [1, -3]
    np.savez(tmp_path / "u.npz", X=np.eye(2), y=np.array([1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(DatasetError, match="label of row 1 .* above the int64 range"):
        load_dataset(tmp_path / "u.npz")
    np.savez(tmp_path / "big.npz", X=np.eye(2), y=np.array([1, 2**62], dtype=np.int64))
    assert load_dataset(tmp_path / "big.npz").y.tolist() == [1, 2**62]  # exact, no float round trip


def test_an_npz_is_bounded_by_its_decompressed_size(tmp_path: Path, monkeypatch):
    from chimera.node import datasets

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, X=np.zeros((20_000, 100)), y=np.zeros(20_000, dtype=np.int64))  # 16 MB of zeros
    assert path.stat().st_size < 200_000
    monkeypatch.setattr(datasets, "MAX_FILE_BYTES", 4 << 20)
    with pytest.raises(datasets.DatasetError, match=r"bomb\.npz: .*above the 4194304 byte limit"):
        datasets.load_dataset(path)
    small = tmp_path / "small.npz"
    np.savez_compressed(small, X=np.ones((10, 3)), y=np.arange(10))
    assert datasets.load_dataset(small).X.shape == (10, 3)


def test_an_npz_header_cannot_size_the_allocation(tmp_path: Path):
    """A tiny entry whose header claims 8 TB: refused from the header, nothing allocated."""
    from chimera.node.datasets import DatasetError, load_dataset

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (10**12,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", buffer.getvalue() + b"\0" * 64)
        archive.writestr("y.npy", buffer.getvalue() + b"\0" * 64)
    with pytest.raises(DatasetError, match=r"liar\.npz: array 'X' of shape \(1000000000000,\)"):
        load_dataset(path)
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as archive:  # an entry that is no .npy at all
        archive.writestr("X", b"not an array")
        archive.writestr("y.npy", b"neither")
    with pytest.raises(DatasetError, match=r"raw\.npz"):
        load_dataset(tmp_path / "raw.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")  # an .npy named .npz: no archive
    with pytest.raises(DatasetError, match=r"plain\.npz"):
        load_dataset(tmp_path / "plain.npz")


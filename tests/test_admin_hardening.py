"""The admin API against anonymous and low-role abuse: the audit log keeps the record of
changes whatever arrives, a request costs bounded work before anyone is authenticated,
the replay table cannot be used to lock other keys out, revoked keys lose their streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import struct
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from chimera.node import admin, admin_keys, audit, cli_admin
from chimera.node.admin import EXIT_REFUSED, EXIT_USAGE, AdminServer
from chimera.node.admin_keys import (
    KeyRing,
    Refused,
    RequestVerifier,
    generate_key,
    public_bytes,
    sign_request,
)
from chimera.node.audit import AuditLog

NODE = "sha256:node"


def _server(tmp_path: Path, **kw) -> AdminServer:
    async def ok(args: dict) -> str:
        return "ran"

    handlers = {"agents_deploy": ok, "tasks_submit": ok, "train_start": ok, "status": ok}
    return AdminServer(tmp_path / "admin.sock", handlers, db=sqlite3.connect(tmp_path / "db", isolation_level=None),
                       node_fingerprint=NODE, **kw)


def _signed(key, cmd: str, args: dict, **kw) -> bytes:
    return msgpack.packb(sign_request(key, NODE, cmd, args, **kw), use_bin_type=True)


# ------------------------------------------------------------------ audit retention


async def test_a_flood_of_refused_remote_requests_keeps_changes_and_costs_few_writes(tmp_path: Path):
    server = _server(tmp_path)
    reply, _ = await server.dispatch(msgpack.packb({"cmd": "admin_key_add", "args": {
        "name": "ops", "role": "admin", "public_key": public_bytes(generate_key())}}), "local")
    assert reply["ok"], reply
    writes = []
    server.audit.write_db.set_trace_callback(lambda sql: writes.append(sql) if "admin_audit" in sql
                                       and sql.lstrip().startswith(("INSERT", "UPDATE")) else None)
    started = time.monotonic()
    for i in range(20_000):
        reply, _ = await server.dispatch(msgpack.packb({"cmd": "status"}), "remote", address="203.0.113.9")
        assert reply["code"] == EXIT_REFUSED
    elapsed = time.monotonic() - started
    rows = server.audit.rows(10_000)
    assert rows[0]["command"] == "admin_key_add"
    refused = [r for r in rows if r["result"] == "refused: unsigned remote request"]
    assert sum(r["count"] for r in refused) == 20_000
    # at most one row (and one count update) per source per second
    assert len(writes) <= 2 * (int(elapsed) + 2), (len(writes), elapsed)


def test_refusals_are_aggregated_per_source_and_window():
    log = AuditLog(sqlite3.connect(":memory:", isolation_level=None))

    def refuse(at_ms: int, source: str, who: str = "x") -> None:
        log.append(at_ms=at_ms, who=f"{who} via {source}", transport="remote", role="-", command="-",
                   args={}, result="refused: bad signature", duration_s=0.0, aggregate=source)

    for i in range(500):  # the claimed key changes every time: still one source
        refuse(5_000 + i, "remote 203.0.113.9", who=f"sha256:{i:016x}")
    refuse(5_100, "remote 198.51.100.1")
    refuse(6_000, "remote 203.0.113.9")  # a new window
    counts = [(r["who"].split(" via ")[1], r["count"]) for r in log.rows(100)]
    assert counts == [("remote 203.0.113.9", 500), ("remote 198.51.100.1", 1), ("remote 203.0.113.9", 1)]


def test_refusals_from_many_sources_share_one_row_beyond_the_open_windows(monkeypatch):
    monkeypatch.setattr(audit, "MAX_OPEN_AGGREGATES", 4)
    log = AuditLog(sqlite3.connect(":memory:", isolation_level=None))
    for i in range(100):
        log.append(at_ms=1_000, who=f"k via remote 10.0.0.{i}", transport="remote", role="-", command="-",
                   args={}, result="refused: x", duration_s=0.0, aggregate=f"remote 10.0.0.{i}")
    rows = log.rows(100)
    assert len(rows) == 5 and sum(r["count"] for r in rows) == 100
    assert rows[-1]["who"].endswith("and other sources") and rows[-1]["count"] == 96


def test_the_audit_log_is_pruned_when_opened(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(audit, "MAX_READ_ROWS", 50)
    monkeypatch.setattr(audit, "PRUNE_EVERY", 10**9)  # a process that never reaches its prune count
    db = sqlite3.connect(tmp_path / "db", isolation_level=None)
    log = AuditLog(db)
    for _ in range(300):
        log.append(at_ms=1, who="w", transport="local", role="observer", command="status", args={},
                   result="ok", duration_s=0.0)
    assert len(log.rows(10_000)) == 300
    AuditLog(db)  # the next start
    assert len(log.rows(10_000)) == 50


async def test_audit_args_keys_are_cut_and_a_row_is_at_most_4_kib(tmp_path: Path):
    server = _server(tmp_path)
    key = generate_key()
    server.keys.add("obs", "observer", public_bytes(key), 1)
    for args in ({"A" * 100_000: 1}, {f"k{i}": "v" * 250 for i in range(60)}):
        reply, _ = await server.dispatch(_signed(key, "no_such_command", args), "remote", address="198.51.100.1")
        assert reply["code"] == EXIT_USAGE
    lengths = [n for (n,) in server.audit.db.execute("SELECT length(args) FROM admin_audit")]
    assert len(lengths) == 2 and max(lengths) <= audit.MAX_ARGS_JSON
    first, second = (r["args"] for r in server.audit.rows(2))
    assert list(first) == ["A" * 256 + "...<100000 chars>"]
    assert second["<cut>"].split()[1] == "chars" and "head" in second


async def test_the_audit_row_of_a_key_revocation_names_the_key(tmp_path: Path):
    server = _server(tmp_path)
    public = public_bytes(generate_key())
    await server.dispatch(msgpack.packb({"cmd": "admin_key_add", "args": {
        "name": "bob", "role": "admin", "public_key": public}}), "local")
    reply, _ = await server.dispatch(msgpack.packb({"cmd": "admin_key_revoke", "args": {"key": "bob"}}), "local")
    assert reply["ok"]
    added, revoked = server.audit.rows(2)
    assert added["args"]["public_key"] == public.hex()
    assert revoked["args"] == {"key": "bob"}
    assert audit.redact({"key": "k", "api_key": "s"}) == {"key": "<redacted>", "api_key": "<redacted>"}


# ------------------------------------------------------------------ bounded decoding


@pytest.mark.parametrize("body", [
    b"\xdd" + (1 << 24).to_bytes(4, "big") + b"\x80" * (1 << 24),                             # 16M empty maps
    b"\xdc\x04\x00" + (b"\xdc\x04\x00" + b"\x80" * 1024) * 1024,                                # 1M, nested
    b"\x91" * 40 + b"\xc0",                                                                    # deep
    msgpack.packb({"signed": b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20), "sig": b"\0" * 64}),
])
async def test_an_anonymous_request_is_refused_before_it_is_built(tmp_path: Path, body: bytes):
    server = _server(tmp_path)
    reply, _ = await server.dispatch(body, "remote", address="203.0.113.9")
    assert reply["code"] in (EXIT_USAGE, EXIT_REFUSED)
    assert any(word in reply["error"] for word in ("entries", "values", "nested")), reply["error"]


def test_check_shape_stops_at_the_value_cap():
    with pytest.raises(admin_keys.UnreadableRequest, match="more than 10 values"):
        admin_keys.check_shape(b"\x9f" + b"\xc0" * 15, max_values=10)
    admin_keys.check_shape(b"\x9f" + b"\xc0" * 15)
    for bad in (b"\xd4\x01\x00", b"\xc1", b"\x92\xc0", b"\xc6\x00\x00\x00\x09abc"):
        with pytest.raises(admin_keys.UnreadableRequest, match="not msgpack"):
            admin_keys.unpack_request(bad)


async def test_the_largest_legitimate_requests_still_pass(tmp_path: Path):
    server = _server(tmp_path)
    key = generate_key()
    server.keys.add("op", "operator", public_bytes(key), 1)
    module = b"\0asm" + b"\1" * ((16 << 20) - 4)
    submit = _signed(key, "tasks_submit", {"module": module, "input": "x" * (512 << 10), "rule": "majority",
                                           "replicas": 3, "wait": True, "wait_s": 10.0, "fuel": 10**9})
    assert len(submit) <= admin.MAX_REQUEST_BYTES
    job = {"job": {"name": "j", "model_kind": "sgd_classifier", "classes": list(range(1024)),
                   "participants": [f"p{i:050d}" for i in range(64)], **{f"f{i}": 1.0 for i in range(16)}}}
    for body in (submit, _signed(key, "agents_deploy", {"ref": "a@1", "module": module, "kind": "task"}),
                 _signed(key, "train_start", job)):
        reply, _ = await server.dispatch(body, "remote", address="127.0.0.1")
        assert reply == {"ok": True, "result": "ran"}


async def test_the_remote_socket_queues_few_requests(tmp_path: Path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    sk = X25519PrivateKey.generate()
    keys = (sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    server = _server(tmp_path, remote_endpoint="tcp://127.0.0.1:0", transport_keys=keys)
    await server.start()
    try:
        router = server.remote.router
        assert router.getsockopt(zmq.RCVHWM) <= 8
        assert router.getsockopt(zmq.MAXMSGSIZE) <= admin.MAX_REQUEST_BYTES + 1024
    finally:
        await server.close()


# ------------------------------------------------------------------ replay table


def _verifier() -> tuple[RequestVerifier, KeyRing]:
    ring = KeyRing(sqlite3.connect(":memory:", isolation_level=None))
    return RequestVerifier(ring, NODE), ring


def _req(key, cmd: str, now_ms: int, nonce: bytes | None = None) -> dict:
    return msgpack.unpackb(msgpack.packb(sign_request(key, NODE, cmd, {}, now_ms=now_ms, nonce=nonce)))


def test_a_request_dated_at_the_window_edge_is_never_accepted_twice():
    verifier, ring = _verifier()
    key = generate_key()
    ring.add("ops", "admin", public_bytes(key), 1)
    t = 1_700_000_000_000
    req = _req(key, "stop", t + 60_000)
    assert verifier.verify(req, t).cmd == "stop"
    for now in (t + 60_000, t + 119_999, t + 120_000):
        with pytest.raises(Refused, match="replayed"):
            verifier.verify(req, now)
    with pytest.raises(Refused, match="more than 60 s"):
        verifier.verify(req, t + 120_001)


def _observer_and_admin():
    """A verifier with an observer key and an admin key: (verifier, observer, admin)."""
    verifier, ring = _verifier()
    obs, root = generate_key(), generate_key()
    ring.add("obs", "observer", public_bytes(obs), 1)
    ring.add("root", "admin", public_bytes(root), 1)
    return verifier, obs, root


def test_one_key_filling_the_replay_table_does_not_lock_out_the_others(monkeypatch):
    monkeypatch.setattr(admin_keys, "MAX_TRACKED_NONCES", 100)
    verifier, obs, root = _observer_and_admin()
    now = 1_700_000_000_000
    for i in range(100):
        verifier.verify(_req(obs, "status", now), now)
    with pytest.raises(Refused, match="too many"):
        verifier.verify(_req(obs, "status", now), now)  # the key over its share
    assert verifier.verify(_req(root, "revoke_peer", now), now).cmd == "revoke_peer"


def test_a_key_has_a_quota_of_its_own(monkeypatch):
    monkeypatch.setattr(admin_keys, "MAX_NONCES_PER_KEY", 20)
    verifier, obs, root = _observer_and_admin()
    now = 1_700_000_000_000
    for i in range(20):
        verifier.verify(_req(obs, "status", now), now)
    with pytest.raises(Refused, match="more than 20 requests"):
        verifier.verify(_req(obs, "status", now), now)
    assert verifier.verify(_req(root, "stop", now), now).cmd == "stop"
    assert verifier.verify(_req(obs, "status", now + 60_001), now + 60_001).cmd == "status"  # forgotten


# ------------------------------------------------------------------ streams after revocation


async def test_a_stream_ends_when_its_key_is_revoked(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(admin, "STREAM_KEY_CHECK_S", 0.05)

    async def ticks(args):
        i = 0
        while True:
            yield {"tick": i}
            i += 1
            await asyncio.sleep(0.01)

    server = _server(tmp_path, streams={"events_follow": ticks})
    await server.start()
    try:
        key = generate_key()
        server.keys.add("obs", "observer", public_bytes(key), 1)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "admin.sock"))
        body = _signed(key, "events_follow", {})
        writer.write(struct.pack(">I", len(body)) + body)

        async def frame() -> dict:
            (n,) = struct.unpack(">I", await reader.readexactly(4))
            return msgpack.unpackb(await reader.readexactly(n))

        assert (await frame())["ok"] is True
        assert "event" in await frame()
        server.keys.revoke("obs", int(time.time() * 1000))

        async def until_end() -> dict:
            while True:
                f = await frame()
                if "event" not in f:
                    return f

        assert await asyncio.wait_for(until_end(), 10) == {"end": "admin key revoked"}
        writer.close()
        await asyncio.sleep(0.05)
        row = server.audit.rows(1)[0]
        assert row["command"] == "events_follow" and row["result"].endswith(", admin key revoked)")
    finally:
        await server.close()


# ------------------------------------------------------------------ CLI


def test_key_create_checks_the_name_before_creating_anything(tmp_path: Path, capsys):
    (tmp_path / "admin-keys").mkdir()
    args = argparse.Namespace(data_dir=str(tmp_path), name="a/b", role="observer", out=None, json=True)
    assert cli_admin.cmd_key_create(args) == EXIT_USAGE
    assert list((tmp_path / "admin-keys").iterdir()) == []
    assert json.loads(capsys.readouterr().out)["code"] == EXIT_USAGE
    args = argparse.Namespace(data_dir=str(tmp_path / "fresh"), name="../x", role="observer", out=None, json=True)
    (tmp_path / "fresh").mkdir()
    assert cli_admin.cmd_key_create(args) == EXIT_USAGE
    assert list((tmp_path / "fresh").iterdir()) == []
